"""VAE ablation for the toy recipe: train only the autoencoder stage of `train-base` for a fixed wall
time with the given overrides, then measure what the bars ask of it (PSNR on base renders, PSNR and
J_eval subject label kept on held-out subject renders). One JSON line per run is appended to --out.

    OMP_NUM_THREADS=1 python scripts/toy/vae_ablation.py --minutes 10 --name lc8 \\
        --set model.latent_channels=8 --set vae.generic_fraction=0.5 --set vae.generic_images=20000

Runs in parallel should each use one thread (two multi-threaded torch jobs starve each other).
"""

import argparse
import json
import tempfile
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="vae_ablation.jsonl")
    ap.add_argument("--set", action="append", default=[])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from dcustom.config import load_config
    from dcustom.toyworld.bars import vae_psnr, vae_subject_figures
    from dcustom.toyworld.config import ToyBaseConfig
    from dcustom.toyworld.train_base import Run, step_generator

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ToyBaseConfig, "configs/toy_base.yaml",
                          overrides=[f"output_dir={tmp}", f"threads={a.threads}", "render_workers=1"] + a.set)
        run = Run(cfg, log=lambda *_: None)
        run.stage = "vae"
        run.build_pool()
        run.stage_setup("vae")
        deadline, t0, step, avg = time.time() + 60 * a.minutes, time.time(), 0, None
        while step < cfg.vae.steps and time.time() < deadline:
            loss = run.vae_step(step_generator(cfg.seed, "vae", step, run.device))
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(run.vae.parameters(), 1.0)
            run.optimizer.step()
            run.lr_sched.step()
            step += 1
            avg = float(loss) if avg is None else 0.98 * avg + 0.02 * float(loss)
        train_s = time.time() - t0
        run.vae.eval()
        base = vae_psnr(run.vae)
        subj = vae_subject_figures(run.vae)
    row = {"name": a.name, "overrides": a.set, "steps": step, "train_seconds": round(train_s), "loss": avg,
           "s_per_step": round(train_s / max(1, step), 3), "base_psnr_db": round(base, 2),
           **{k: (round(v, 3) if isinstance(v, float) else {kk: round(vv, 3) for kk, vv in v.items()})
              for k, v in subj.items()}}
    print(json.dumps(row))
    with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
