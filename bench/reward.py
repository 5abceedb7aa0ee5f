"""Reward fine-tuning cost per update: gradient policies and checkpointing vs a plain full chain.

    python bench/reward.py --arch tiny-sd15                       # CPU, seconds
    python bench/reward.py --arch sd15 --device cuda --steps 50   # SD1.5 architecture, random weights, 512 px

plain:    DRaFT full chain with every UNet call kept in the graph and no gradient checkpointing
          (what a first implementation does; at 512 px on SD1.5 it needs tens of GiB).
measured: the same full chain with per-call checkpointing, and DRaFT-K with K=1 (the default),
          both through dcustom's RewardSampler; one update = rollout + colourfulness reward +
          backward + AdamW step on a rank-4 UNet LoRA.
Prints seconds per update (median after a warm-up), peak CUDA memory, and ratios against plain.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_adapter import build_pipeline, peak_gib, reset_peak  # noqa: E402  (same models as the adapter bench)


def time_updates(pipe, policy_name: str, checkpointing: bool, args) -> tuple[float, str]:
    import torch

    from dcustom.trainers.reward.lora import add_reward_lora
    from dcustom.trainers.reward.policies import make_policy
    from dcustom.trainers.reward.rewards import colourfulness
    from dcustom.trainers.reward.sampler import RewardSampler

    if hasattr(pipe.unet, "peft_config"):
        pipe.unet.delete_adapters(list(pipe.unet.peft_config))
    params = list(add_reward_lora(pipe.unet).values())  # rank 4, alpha = rank
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    sampler = RewardSampler(pipe, steps=args.steps, guidance_scale=5.0, checkpointing=checkpointing)
    cond = sampler.encode(["a colourful photo"] * args.batch)
    policy = make_policy(policy_name, k=1)
    times = []
    reset_peak(args.device)
    for i in range(args.warmup + args.updates):
        start = time.perf_counter()
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.device.startswith("cuda")):
            rollout = sampler.rollout(cond, policy, generator=torch.Generator(device="cpu").manual_seed(i))
            loss = -colourfulness(rollout.images.float()).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), peak_gib(args.device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="tiny-sd15", help="tiny-sd15, tiny-sdxl, sd15 or sdxl")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps per trajectory")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--skip-plain", action="store_true", help="skip the plain baseline (it may not fit in memory)")
    args = parser.parse_args()

    import torch

    torch.manual_seed(0)
    pipe = build_pipeline(args.arch).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    if not args.skip_plain:
        try:
            rows.append(("plain full chain (no checkpointing)", *time_updates(pipe, "draft", False, args)))
        except torch.OutOfMemoryError:  # the point of the comparison: report it instead of dying
            rows.append(("plain full chain (no checkpointing)", float("nan"), f"OOM>{peak_gib(args.device)}"))
            torch.cuda.empty_cache()
    rows.append(("full chain, checkpointed", *time_updates(pipe, "draft", True, args)))
    rows.append(("DRaFT-K, K=1, checkpointed", *time_updates(pipe, "draft_k", True, args)))
    base = rows[0][1]
    print(f"{args.arch} on {args.device}: {args.steps} DDIM steps, batch {args.batch}, median of {args.updates} updates")
    print(f"{'variant':40s} {'s/update':>10s} {'peak':>12s} {'speed vs plain':>18s}")
    for name, seconds, peak in rows:
        ratio = f"{base / seconds:17.2f}x" if base == base else f"{'plain did not fit':>18s}"
        print(f"{name:40s} {seconds:10.3f} {peak:>12s} {ratio}")


if __name__ == "__main__":
    main()
