"""Does a subject adapter fail under classifier-free guidance? (docs/results.md, "Why the ladybug is never recognised")

    python scripts/toy/guidance_probe.py runs/eval_subject/lora-ladybug/run ladybug --guidance 1,3,5,7.5

For each guidance scale, the adapter draws its subject on the three unseen backgrounds x 8 seeds (30 DDIM
steps) twice: as the pipeline does (both guidance branches through the adapter), and with the unconditional
branch taken from the base model (the adapter switched off for it). J_eval judges subject and background.
One thread.
"""

import argparse
import json

import torch


def sample(pipe, prompts, seeds, guidance, base_unconditional):
    """DDIM with classifier-free guidance, the noise drawn per seed as the pipeline draws it."""
    from diffusers import DDIMScheduler

    unet, sched = pipe.unet, DDIMScheduler.from_config(pipe.scheduler.config)
    size = unet.config.sample_size
    images = []
    with torch.no_grad():
        null = pipe.encode_prompt([""] * len(seeds), "cpu", 1, False)[0]
        for prompt in prompts:
            cond = pipe.encode_prompt([prompt] * len(seeds), "cpu", 1, False)[0]
            x = torch.cat([torch.randn((1, unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(s))
                           for s in seeds])
            sched.set_timesteps(30)
            x = x * sched.init_noise_sigma
            for t in sched.timesteps:
                eps_c = unet(x, t, cond).sample
                if base_unconditional:
                    unet.disable_adapters()
                eps_u = unet(x, t, null).sample
                if base_unconditional:
                    unet.enable_adapters()
                x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
            decoded = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
            images += pipe.image_processor.postprocess(decoded, output_type="pil")
    return images


def main():
    from dcustom.toyworld.grammar import SUBJECT_NAMES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="adapter folder or file (e.g. a run folder or its best/)")
    parser.add_argument("subject", choices=SUBJECT_NAMES)
    parser.add_argument("--guidance", default="1,3,5,7.5")
    parser.add_argument("--seeds", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from dcustom.adapters.load import load_adapter
    from dcustom.models import load_pipeline
    from dcustom.toyworld.judges import load_judge
    from dcustom.toyworld.subject_eval import judge_subject, subject_prompts
    from dcustom.toyworld.subjects import trigger_phrase
    from dcustom.trainers.fidelity import UNSEEN_BACKGROUNDS

    pipe = load_pipeline("builtin:toy", device="cpu", dtype="fp32")
    load_adapter(pipe, args.adapter)
    judge, seeds = load_judge("eval"), list(range(args.seeds))
    prompts = subject_prompts(trigger_phrase(args.subject), UNSEEN_BACKGROUNDS)
    backgrounds = [bg for bg in UNSEEN_BACKGROUNDS for _ in seeds]
    for guidance in (float(g) for g in args.guidance.split(",")):
        for base_unconditional in (False, True):
            scores = judge_subject(sample(pipe, prompts, seeds, guidance, base_unconditional), args.subject, backgrounds, judge)
            print(json.dumps({"guidance": guidance, "unconditional": "base" if base_unconditional else "adapter", **scores}),
                  flush=True)


if __name__ == "__main__":
    main()
