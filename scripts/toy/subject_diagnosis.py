"""Which part fails when a subject does not appear? (issue 16, step 1: diagnose before tuning)

On builtin:toy with 5 renders of a held-out subject (`toyworld.subjects.write_subject_examples`):

- `vae`: does the autoencoder carry the subject? J_eval's subject label on VAE reconstructions of 32 renders.
- `train`: train the UNet with the shipped denoising objective (`trainers.denoising.DenoisingObjective`,
  masked loss when the examples have masks), either fully (`--mode full`: DreamBooth without an adapter)
  or through a peft LoRA (`--mode lora`), and at a few step counts draw the subject on the backgrounds the
  examples show (seen) and on the others (unseen); J_eval judges subject and background.
  `--images 1` is the single-image over-fit check: if even that fails, the model or the objective is
  what fails, not the data.

One JSON line per measurement goes to --out.

    OMP_NUM_THREADS=2 python scripts/toy/subject_diagnosis.py vae
    OMP_NUM_THREADS=2 python scripts/toy/subject_diagnosis.py train --mode full --lr 5e-5 --steps 200,400,800
"""

import argparse
import json
import tempfile
import time
from types import SimpleNamespace

import torch

SEEN = ("white", "gray", "striped")
UNSEEN = ("black", "dotted", "checkered")


def vae_carry(pipe, judge, subject: str, n: int = 32) -> dict:
    """Fraction of n subject renders whose VAE reconstruction J_eval still labels as the subject."""
    from dcustom.toyworld.judges import to_tensor
    from dcustom.toyworld.render import render_subject

    images = [im for im, _, _ in render_subject(subject, n, seed=123)]
    x = to_tensor(images) * 2 - 1
    with torch.no_grad():
        rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    rec_images = [pipe.image_processor.postprocess(rec[i:i + 1])[0] for i in range(n)]
    kept = [label == subject for label in judge.predict(rec_images)["subject"]["labels"]]
    orig = [label == subject for label in judge.predict(images)["subject"]["labels"]]
    psnr = float((10 * torch.log10(4.0 / ((rec - x) ** 2).mean(dim=(1, 2, 3)))).mean())
    return {"renders_recognised": sum(orig) / n, "reconstructions_recognised": sum(kept) / n, "psnr_db": round(psnr, 2)}


def judge_subject(pipe, judge, subject: str, phrase: str, seeds=(0, 1, 2, 3), steps: int = 20, guidance: float = 5.0):
    from dcustom.toyworld.evaluate import generate_images

    out = {}
    for name, bgs in (("seen", SEEN), ("unseen", UNSEEN)):
        prompts = [f"a {phrase} on a {bg} background" for bg in bgs]
        images = generate_images(pipe, prompts, seeds, steps=steps, guidance=guidance)
        preds = judge.predict(images)
        expected = [bg for bg in bgs for _ in seeds]
        out[name] = {"subject": sum(lbl == subject for lbl in preds["subject"]["labels"]) / len(images),
                     "background": sum(a == b for a, b in zip(preds["background"]["labels"], expected)) / len(images)}
        out[name]["images"] = images
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("vae", "train"))
    ap.add_argument("--subject", default="robot")
    ap.add_argument("--mode", choices=("full", "lora", "partial"), default="full")
    ap.add_argument("--train-params", default="attn", help="partial: regex over UNet parameter names trained fully")
    ap.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", default="200,400,800")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--images", type=int, default=5)
    ap.add_argument("--no-masks", action="store_true")
    ap.add_argument("--outside", type=float, default=0.1, help="mask_outside_weight")
    ap.add_argument("--min-snr", type=float, default=5.0)
    ap.add_argument("--targets", default="to_q,to_k,to_v,to_out.0")
    ap.add_argument("--grid", default=None, help="save a grid of the last measurement's images here")
    ap.add_argument("--out", default="/work/runs/subject_diag/diag.jsonl")
    ap.add_argument("--name", default="")
    a = ap.parse_args()

    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    from dcustom.models import load_pipeline
    from dcustom.toyworld.judges import load_judge
    from dcustom.toyworld.subjects import write_subject_examples

    torch.manual_seed(0)
    pipe = load_pipeline("builtin:toy", device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge("eval")
    rows = []
    if a.what == "vae":
        for subject in ("robot", "ladybug", "pine"):
            rows.append({"what": "vae", "subject": subject, **vae_carry(pipe, judge, subject)})
    else:
        from dcustom.data import DataConfig
        from dcustom.trainers.denoising import DenoisingObjective

        with tempfile.TemporaryDirectory() as tmp:
            folder, phrase = write_subject_examples(a.subject, tmp, n=a.images, masks=not a.no_masks)
            data = DataConfig(images=str(folder), instance_prompt=f"a {phrase}", flip=True, buckets=False,
                              mask_outside_weight=a.outside)
            obj = DenoisingObjective("builtin:toy", data, a.min_snr or None, 0.0, pipe=pipe)
            ctx = SimpleNamespace(device=torch.device("cpu"), weight_dtype=torch.float32, cfg=SimpleNamespace(seed=0))
            obj.load(ctx)
            unet = pipe.unet
            if a.mode == "full":
                unet.requires_grad_(True)
            elif a.mode == "partial":  # which part of the UNet must move? train only the matching tensors, fully
                import re

                for name, p in unet.named_parameters():
                    p.requires_grad_(re.search(a.train_params, name) is not None)
            else:
                from peft import LoraConfig

                unet.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.alpha or a.rank, target_modules=a.targets.split(","),
                                            init_lora_weights="gaussian"))
            params = [p for p in unet.parameters() if p.requires_grad]
            obj.prepare_examples()
            obj.cache_text()
            opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=1e-2 if a.mode == "lora" else 0.0)
            checkpoints = sorted(int(s) for s in a.steps.split(","))
            step, t0, avg = 0, time.time(), None
            for stop in checkpoints:
                unet.train()
                while step < stop:
                    picks = torch.randint(len(obj.examples), (a.batch,)).tolist()
                    loss = obj.loss([obj.examples[i] for i in picks])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    step += 1
                    avg = float(loss) if avg is None else 0.95 * avg + 0.05 * float(loss)
                unet.eval()
                train_s = time.time() - t0
                figures = judge_subject(pipe, judge, a.subject, phrase)
                images = figures["seen"].pop("images") + figures["unseen"].pop("images")
                rows.append({"what": "train", "name": a.name, "subject": a.subject, "mode": a.mode, "lr": a.lr,
                             "rank": a.rank if a.mode == "lora" else None,
                             "alpha": a.alpha, "train_params": a.train_params if a.mode == "partial" else None,
                             "trained": sum(p.numel() for p in params), "images": a.images,
                             "masks": not a.no_masks, "outside": a.outside, "batch": a.batch, "step": step,
                             "loss": round(avg, 4), "train_seconds": round(train_s, 1), **figures})
                print(json.dumps(rows[-1]), flush=True)
                t0 = time.time() - train_s
            if a.grid:
                from dcustom.toyworld.render import grid

                sheet = grid(images, columns=12)
                sheet.resize((sheet.width * 2, sheet.height * 2), 0).save(a.grid)
    import os

    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    if a.what == "vae":
        for row in rows:
            print(json.dumps(row))


if __name__ == "__main__":
    main()
