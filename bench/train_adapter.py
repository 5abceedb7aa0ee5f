"""Adapter-training throughput: the plain diffusers+peft recipe vs dcustom's recipe, in the same run.

    python bench/train_adapter.py --arch tiny-sd15            # CPU, seconds
    python bench/train_adapter.py --arch sd15 --device cuda    # SD1.5 architecture, random weights, 512 px
    python bench/train_adapter.py --arch sdxl --device cuda    # SDXL architecture, random weights, 1024 px
    python bench/train_adapter.py --model builtin:toy           # the trained toy model, its subject renders, CPU

plain:     batch 1, VAE and text encoder run every step (the documented DreamBooth-LoRA loop),
           fp16 autocast on CUDA (fp32 on CPU), LoRA params fp32, AdamW.
optimized: dcustom's trainer: latents (both flips) and text embeddings cached once, batch = --batch
           (5 subject images repeated), bf16 autocast on CUDA, fused loop from dcustom.trainers.loop.
Prints samples/s (median over timed steps after warm-up), peak CUDA memory, and the ratio.
Random weights give the same FLOPs and memory as the real models; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build_pipeline(arch: str):
    """A pipeline with the real SD1.5 / SDXL architecture (random weights) or a tiny one."""
    if arch.startswith("tiny-"):
        from dcustom.tiny import build_tiny_pipeline

        return build_tiny_pipeline({"tiny-sd15": "sd15", "tiny-sdxl": "sdxl"}[arch])
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dcustom.tiny import _tokenizer

    torch.manual_seed(0)
    tok = _tokenizer()
    vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2,
                        sample_size=1024 if arch == "sdxl" else 512)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

    def clip(hidden, layers, heads, inter, projection=False, act="quick_gelu"):
        cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                             intermediate_size=inter, max_position_embeddings=77, hidden_act=act, projection_dim=hidden,
                             bos_token_id=len(tok) - 2, eos_token_id=len(tok) - 1, pad_token_id=len(tok) - 1)
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)

    if arch == "sd15":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        return StableDiffusionPipeline(vae=vae, text_encoder=clip(768, 12, 12, 3072), tokenizer=tok, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if arch == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
        return StableDiffusionXLPipeline(vae=vae, text_encoder=clip(768, 12, 12, 3072), text_encoder_2=clip(1280, 32, 20, 5120, True, "gelu"),
                                         tokenizer=tok, tokenizer_2=_tokenizer(), unet=unet, scheduler=sched)
    raise SystemExit(f"unknown --arch {arch!r}; accepted: tiny-sd15, tiny-sdxl, sd15, sdxl")


def subject_folder(folder: Path, n: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def peak_gib(device: str) -> str:
    import torch

    return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device == "cuda" else "n/a (CPU)"


def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def plain_recipe(pipe, images: list, prompt: str, size: int, steps: int, warmup: int, device: str, rank: int) -> list:
    """The documented diffusers+peft DreamBooth-LoRA step, batch 1, encoders every step; returns step times."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    from dcustom.data import open_rgb, resize_crop, to_tensor

    unet, vae = pipe.unet, pipe.vae
    for m in (unet, vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if m is not None:
            m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    is_xl = hasattr(pipe, "text_encoder_2") and pipe.text_encoder_2 is not None
    amp = torch.autocast("cuda", dtype=torch.float16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    scaler = torch.amp.GradScaler("cuda") if device == "cuda" else None
    pixels = [to_tensor(resize_crop(open_rgb(p)[0], (size, size))[0]) for p in images]
    times = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        x = pixels[step % len(pixels)][None].to(device, vae.dtype)
        with amp:
            with torch.no_grad():
                latents = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
                if is_xl:
                    embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, do_classifier_free_guidance=False)
                else:
                    embeds, _ = pipe.encode_prompt(prompt, device, 1, False)
            noise = torch.randn_like(latents)
            t = torch.randint(0, sched.config.num_train_timesteps, (1,), device=device)
            kwargs = {}
            if is_xl:
                time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=embeds.dtype)
                kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
            pred = unet(sched.add_noise(latents, noise, t), t, embeds, **kwargs).sample
            loss = F.mse_loss(pred.float(), noise.float())
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    unet.delete_adapters(["default"]) if hasattr(unet, "delete_adapters") else None
    return times[warmup:]


def optimized_recipe(pipe, folder: Path, prompt: str, size: int, steps: int, warmup: int, device: str, batch: int,
                     rank: int, out: Path) -> list:
    from dcustom.data import DataConfig
    from dcustom.trainers.adapter.config import LoraTrainConfig
    from dcustom.trainers.adapter.trainer import train
    from dcustom.trainers.loop import LoopConfig

    stamps = []

    def on_event(e):
        if e["event"] == "step":
            if device == "cuda":
                import torch

                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    cfg = LoraTrainConfig(model="bench", data=DataConfig(images=str(folder), instance_prompt=prompt, resolution=size, buckets=False),
                          train=LoopConfig(output_dir=str(out), steps=warmup + steps + 1, batch_size=batch, device=device,
                                           checkpoint_every=0, mixed_precision="auto", optimizer="adamw"),
                          rank=rank, alpha=float(rank), validation_prompts=[], write_kohya=False, min_snr_gamma=None)
    train(cfg, pipe=pipe, on_event=on_event, progress=False)
    diffs = [b - a for a, b in zip(stamps, stamps[1:])]
    return diffs[warmup:]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="tiny-sd15", help="tiny-sd15, tiny-sdxl, sd15, sdxl")
    ap.add_argument("--model", default=None, help="a model spec instead of --arch (e.g. builtin:toy: trained on the "
                                                  "robot's renders at 64 px)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=None, help="pixels (default: 64 tiny, 512 sd15, 1024 sdxl)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.size or {"sd15": 512, "sdxl": 1024}.get(args.arch, 64)
    prompt = "a photo of sks dog"
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            from dcustom.models import load_pipeline
            from dcustom.toyworld.subjects import write_subject_examples

            pipe = load_pipeline(args.model, device=args.device, dtype="fp32")
            size = args.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
            if args.model == "builtin:toy":
                folder, phrase = write_subject_examples("robot", Path(tmp) / "robot", masks=False)
                prompt = f"a photo of a {phrase}"
            else:
                folder = subject_folder(Path(tmp), 5, size)
        else:
            folder = subject_folder(Path(tmp), 5, size)
            pipe = build_pipeline(args.arch).to(args.device)
        images = sorted(p for p in folder.glob("*.png") if not p.name.endswith(".mask.png"))
        pipe.set_progress_bar_config(disable=True)
        reset_peak(args.device)
        plain = plain_recipe(pipe, images, prompt, size, args.steps, args.warmup, args.device, args.rank)
        plain_mem = peak_gib(args.device)
        if args.model:  # fresh weights, no leftover adapter
            pipe = load_pipeline(args.model, device=args.device, dtype="fp32")
        else:
            pipe = build_pipeline(args.arch).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        reset_peak(args.device)
        opt = optimized_recipe(pipe, folder, prompt, size, args.steps, args.warmup, args.device, args.batch, args.rank,
                               Path(tmp) / "run")
        opt_mem = peak_gib(args.device)
    plain_sps = 1 / statistics.median(plain)
    opt_sps = args.batch / statistics.median(opt)
    print(f"{'model=' + args.model if args.model else 'arch=' + args.arch} size={size} device={args.device} rank={args.rank} timed_steps={args.steps} warmup={args.warmup} "
          f"torch_threads={torch.get_num_threads()}")
    print(f"plain     (batch 1, encoders every step)        : {plain_sps:8.2f} samples/s  peak {plain_mem}")
    print(f"optimized (batch {args.batch}, cached latents+text)      : {opt_sps:8.2f} samples/s  peak {opt_mem}")
    print(f"ratio optimized/plain: {opt_sps / plain_sps:.2f}x")


if __name__ == "__main__":
    main()
