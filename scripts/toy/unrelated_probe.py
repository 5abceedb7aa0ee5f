"""Which unrelated prompts does a subject adapter get wrong, and how? (docs/results.md, "What holds")

    python scripts/toy/unrelated_probe.py runs/eval_subject/lora-ladybug/run base --steps 30 --guidance 7.5

`dcustom eval subject`'s 12 unrelated base prompts x seeds 0 and 1, drawn with each adapter folder (or "base",
the model alone), judged by J_eval. Prints the count right and, for every image that is wrong, its prompt, seed
and what J_eval saw (shape, colour, background): a colour or shape that drifts to the subject's shows up here.
One thread.
"""

import argparse

import torch


def main():
    from dcustom.adapters.load import load_adapter
    from dcustom.models import load_pipeline
    from dcustom.toyworld.evaluate import generate_images
    from dcustom.toyworld.grammar import parse_caption
    from dcustom.toyworld.judges import load_judge
    from dcustom.toyworld.subject_eval import unrelated_prompts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapters", nargs="+", help="adapter folders (a run folder, its best/), or base")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (20: as `eval subject` measures it)")
    parser.add_argument("--guidance", type=float, default=5.0, help="guidance (5: as `eval subject` measures it)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    judge, prompts, seeds = load_judge("eval"), unrelated_prompts(), [0, 1]
    for folder in args.adapters:
        pipe = load_pipeline("builtin:toy", device="cpu", dtype="fp32")
        if folder != "base":
            load_adapter(pipe, folder)
        images = generate_images(pipe, prompts, seeds, steps=args.steps, guidance=args.guidance)
        seen = judge.predict(images)
        wrong = []
        for i, prompt in enumerate(p for p in prompts for _ in seeds):
            wanted = parse_caption(prompt)
            got = {head: seen[head]["labels"][i] for head in ("shape", "colour", "background")}
            if any(got[h] != wanted[h] for h in got):
                wrong.append((prompt, seeds[i % len(seeds)], got))
        print(f"{folder}: {len(images) - len(wrong)} / {len(images)} right")
        for prompt, seed, got in wrong:
            print(f"    {prompt!r} seed {seed}: J_eval saw {got['colour']} {got['shape']} on {got['background']}")


if __name__ == "__main__":
    main()
