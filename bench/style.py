"""Style-transfer benchmark: a plain two-pass StyleID against our optimised path, same run.

plain      : per pair, invert content and style recording q, k and v of every injected layer in
             fp32 (what the official StyleID code stores), no cache, then injected sampling.
optimised  : record only what is read (content q, style k/v) in fp16, and cache inversions
             (trajectory + features) by image/model/scheduler/steps/layers/dtype, so a style
             reused across contents -- or a pair re-run with other γ/T -- is inverted once.
in_batch   : no feature store at all; references ride in the batch (for memory-bound cases).

Prints seconds per pair, feature-store bytes and (on CUDA) peak memory, and the ratios to plain.
Absolute times are only meaningful on a GPU; on CPU with tiny models quote the ratios.

    python bench/style.py --model tiny:sd15 --steps 10 --contents 4
    python bench/style.py --model runwayml/stable-diffusion-v1-5 --steps 50 --device cuda
    python bench/style.py --model sd15 --steps 50 --device cuda    # SD1.5 architecture, random weights (also sdxl)
"""

from __future__ import annotations

import argparse
import time


def images(n, seed, size=64):
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        # smooth random colour fields: something a VAE encodes like a picture, not like white noise
        small = (rng.rand(4, 4, 3) * 255).astype("uint8")
        out.append(Image.fromarray(small).resize((size, size), Image.BICUBIC))
    return out


def sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


RANDOM_ARCHS = ("sd15", "sdxl")


def random_arch_pipeline(arch: str, device: str, dtype: str):
    """SD1.5 / SDXL built from their configs with random weights (bench/train_adapter.py's builder), moved to
    the device in fp16 on CUDA (fp32 elsewhere) unless --dtype says otherwise."""
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_adapter import build_pipeline

    from dcustom.models import resolve_device

    device = resolve_device(device)
    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    torch_dtype = names.get(dtype, torch.float16 if device.startswith("cuda") else torch.float32)
    from diffusers import DDIMScheduler

    pipe = build_pipeline(arch).to(device, torch_dtype)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def plain_pair(pipe, content, style, cfg, layers):
    """The uncached two-pass recipe: full q/k/v in fp32 for both images, every pair."""
    from dcustom.pipelines.inversion import invert, sample_from
    from dcustom.pipelines.style_injection import style_injection

    h, w = cfg.resolution or None, cfg.resolution or None
    c = invert(pipe, content, steps=cfg.steps, layers=layers, kinds=("q", "k", "v"), feature_dtype="fp32",
               height=h, width=w)
    s = invert(pipe, style, steps=cfg.steps, layers=layers, kinds=("q", "k", "v"), feature_dtype="fp32",
               height=h, width=w)
    with style_injection(pipe, c, s, layers, gamma=cfg.gamma, temperature=cfg.temperature) as run:
        latents = sample_from(pipe, run.start_latent, cfg.steps)
    return latents, c.features.nbytes() + s.features.nbytes()


def main():
    import torch

    from dcustom.models import family_of, load_pipeline
    from dcustom.pipelines.hooks import resolve_layers
    from dcustom.pipelines.inversion import InversionCache, invert
    from dcustom.pipelines.style_injection import StyleInjectionConfig
    from dcustom.pipelines.transfer import stylize

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny:sd15", help="a model spec, or sd15 / sdxl for the real architecture "
                    "with random weights")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--contents", type=int, default=4, help="content images stylized with one style")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model in RANDOM_ARCHS:  # the real architecture with random weights: same FLOPs and memory, no download
        pipe = random_arch_pipeline(args.model, args.device, args.dtype)
    else:
        pipe = load_pipeline(args.model, dtype=args.dtype, device=args.device)
    device = str(pipe.device)
    cfg = StyleInjectionConfig(model=args.model, steps=args.steps)
    layers = resolve_layers(pipe.unet, cfg.layers, family_of(pipe))
    contents, style = images(args.contents, 0), images(1, 99)[0]
    print(f"model {args.model} on {device} ({pipe.unet.dtype}), {args.steps} steps, {len(layers)} injected layers, "
          f"{args.contents} contents x 1 style")

    # warm-up (first calls allocate and pick kernels), not timed
    invert(pipe, contents[0], steps=2)

    def measure(fn):
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t0 = time.perf_counter()
        extra = fn()
        sync(device)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
        return seconds, peak, extra

    rows = {}
    # 1. plain: every pair from scratch
    secs, peak, store = measure(lambda: [plain_pair(pipe, c, style, cfg, layers)[1] for c in contents])
    rows["plain two-pass (fp32 q/k/v, no cache)"] = (secs / len(contents), peak, max(store))
    # 2. optimised, cold cache: style inverted once for all contents
    cache = InversionCache()

    secs, peak, _ = measure(lambda: [stylize(pipe, c, style, cfg, cache=cache) for c in contents])
    store_opt = (invert(pipe, contents[0], steps=args.steps, layers=layers, kinds=("q",), cache=cache).features.nbytes()
                 + invert(pipe, style, steps=args.steps, layers=layers, kinds=("k", "v"), cache=cache).features.nbytes())
    rows["optimised, cold cache (fp16 q | k,v; style inverted once)"] = (secs / len(contents), peak, store_opt)
    # 3. optimised, warm cache: the same pairs again with another gamma (a parameter sweep)
    sweep = StyleInjectionConfig(model=args.model, steps=args.steps, gamma=0.3)
    secs, peak, _ = measure(lambda: [stylize(pipe, c, style, sweep, cache=cache) for c in contents])
    rows["optimised, warm cache (re-run with gamma 0.3)"] = (secs / len(contents), peak, store_opt)
    # 4. in-batch references: no feature store
    batch_cfg = StyleInjectionConfig(model=args.model, steps=args.steps, feature_source="in_batch")
    secs, peak, _ = measure(lambda: [stylize(pipe, c, style, batch_cfg, cache=InversionCache()) for c in contents])
    rows["in-batch references (no feature store, no cache)"] = (secs / len(contents), peak, 0)

    base_s, base_peak, base_store = rows["plain two-pass (fp32 q/k/v, no cache)"]
    print(f"{'variant':60s} {'s/pair':>9s} {'x plain':>8s} {'store MiB':>10s} {'peak GiB':>9s}")
    for name, (s, peak, store) in rows.items():
        peak_text = f"{peak:9.2f}" if peak == peak else f"{'n/a':>9s}"  # peak memory is measured on CUDA only
        print(f"{name:60s} {s:9.3f} {base_s / s:7.2f}x {store / 2**20:10.2f} {peak_text}")
    print(f"feature store: optimised / plain = {rows['optimised, cold cache (fp16 q | k,v; style inverted once)'][2] / base_store:.3f}")


if __name__ == "__main__":
    main()
