"""Do dcustom's files compute the same weights in diffusers with transformers 4 as here (transformers 5)?

Two steps, two interpreters:

  OMP_NUM_THREADS=1 .venv/bin/python scripts/interop/t4_check.py prepare /tmp/t4check
      (this venv: transformers 5) trains tiny SD1.5 / SDXL adapters with dcustom's trainer (LoRA with a
      text-encoder LoRA, alpha != rank on both; DoRA; OFT), writes every file kind, exports the base pipelines in
      a layout transformers 4 reads, and renders reference images: each file loaded by dcustom here (embeddings:
      by diffusers' load_textual_inversion here).
  OMP_NUM_THREADS=1 /tmp/t4venv/bin/python scripts/interop/t4_check.py check /tmp/t4check
      (a scratch venv outside the repo: torch==2.13.0 first, then 'transformers<5' 'diffusers==0.35.*' peft
      safetensors accelerate) loads each file with the same diffusers APIs there, renders the same images and
      prints the max pixel difference per file; exits 1 when a file that should load fails or differs by > 1e-4.

The check also loads a diffusers LoRA file in the form dcustom wrote before issue 19 (first text encoder as
`text_encoder.encoder.layers.*`): plain diffusers with transformers 4 rejects it, dcustom's reader
(canonical_diffusers_lora) fixes it. Needs only torch, diffusers, transformers, peft and safetensors in the
scratch venv (dcustom's tokenizer writer and key fixer are imported from this checkout, no dependencies).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PROMPT = "a photo of sks dog"
TOKEN = "<toy-subject>"
STEPS, SIZE, TOL = 2, 32, 1e-4


# ---------------------------------------------------------------------------------------------------------------------
def render(pipe, prompt=PROMPT):
    import torch

    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=STEPS, generator=g, output_type="pt", width=SIZE, height=SIZE).images


def load_case(pipe, case: dict, folder: Path):
    """Put one file on a pipeline with the plain diffusers / peft API the case names. Returns the prompt to render."""
    path = folder / case["path"]
    api = case["api"]
    if api == "load_lora_weights":
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="x")
    elif api == "peft":
        from peft import PeftConfig, set_peft_model_state_dict
        from safetensors.torch import load_file

        pipe.unet.add_adapter(PeftConfig.from_pretrained(str(path)), adapter_name="x")
        result = set_peft_model_state_dict(pipe.unet, load_file(str(path / "adapter_model.safetensors")), adapter_name="x")
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"unexpected keys {result.unexpected_keys[:2]}")
    elif api == "textual_inversion":
        pipe.load_textual_inversion(str(path), token=TOKEN)
    elif api == "textual_inversion_sdxl":
        from safetensors.torch import load_file

        state = load_file(str(path))
        pipe.load_textual_inversion(state["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    elif api == "dcustom_canonical_then_load_lora_weights":
        import tempfile

        from safetensors.torch import load_file, save_file

        from dcustom.adapters.files import canonical_diffusers_lora

        with tempfile.TemporaryDirectory() as tmp:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            save_file(canonical_diffusers_lora(load_file(str(path))), f"{tmp}/fixed.safetensors", metadata=meta)
            pipe.load_lora_weights(tmp, weight_name="fixed.safetensors", adapter_name="x")
    else:
        raise ValueError(api)
    return f"a photo of {TOKEN}" if api.startswith("textual_inversion") else PROMPT


# ---------------------------------------------------------------------------------------------------------------------
def export_base(pipe, folder: Path):
    """A diffusers folder transformers 4 reads: text-encoder weights with the `text_model.` level, slow-tokenizer files."""
    from safetensors.torch import save_file

    from dcustom.tiny import TINY_WORDS
    from dcustom.tokenizer_vocab import write_clip_tokenizer

    pipe.save_pretrained(str(folder))
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is None:
            continue
        state = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v.contiguous()
                 for k, v in encoder.state_dict().items()}
        for old in (folder / name).glob("*.safetensors"):
            old.unlink()
        save_file(state, str(folder / name / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer", "tokenizer_2"):
        if (folder / name).is_dir():
            write_clip_tokenizer(TINY_WORDS, folder / name)
            (folder / name / "tokenizer.json").unlink(missing_ok=True)  # the slow files alone, as both versions read


def load_base(folder: Path, kind: str):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def tokenizer(name):
        return CLIPTokenizer(str(folder / name / "vocab.json"), str(folder / name / "merges.txt"), pad_token="<|endoftext|>",
                             model_max_length=77)

    parts = dict(vae=AutoencoderKL.from_pretrained(str(folder / "vae")), unet=UNet2DConditionModel.from_pretrained(str(folder / "unet")),
                 scheduler=DDIMScheduler.from_pretrained(str(folder / "scheduler")),
                 text_encoder=CLIPTextModel.from_pretrained(str(folder / "text_encoder")), tokenizer=tokenizer("tokenizer"))
    if kind == "sdxl":
        parts.update(text_encoder_2=CLIPTextModelWithProjection.from_pretrained(str(folder / "text_encoder_2")),
                     tokenizer_2=tokenizer("tokenizer_2"))
        pipe = StableDiffusionXLPipeline(**parts)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
def prepare(out: Path):
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file

    from dcustom.adapters import files
    from dcustom.adapters.convert import convert_lora
    from dcustom.adapters.embeddings import save_embedding
    from dcustom.data import DataConfig
    from dcustom.single_file import save_single_file
    from dcustom.tiny import build_tiny_pipeline
    from dcustom.trainers.adapter.config import LoraTrainConfig, OftTrainConfig
    from dcustom.trainers.adapter.trainer import train
    from dcustom.trainers.loop import LoopConfig

    out.mkdir(parents=True, exist_ok=True)
    images = out / "images"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(images / f"{i}.png")
    data = DataConfig(images=str(images), instance_prompt=PROMPT, resolution=SIZE)

    def loop(name):
        return LoopConfig(output_dir=str(out / name), steps=2, lr=2e-2, device="cpu", checkpoint_every=0)

    cases = []
    for kind in ("sd15", "sdxl"):
        export_base(build_tiny_pipeline(kind), out / f"base-{kind}")
        run = f"lora-{kind}"
        train(LoraTrainConfig(model=f"tiny:{kind}", data=data, train=loop(run), rank=4, alpha=8.0, text_encoder_lora=True,
                              text_encoder_rank=2, text_encoder_alpha=3.0, validation_prompts=[]), progress=False)
        cases += [dict(kind=kind, name=f"LoRA diffusers file ({kind}, + text encoders)", path=f"{run}/{files.DIFFUSERS_LORA_NAME}",
                       api="load_lora_weights", expect="equal"),
                  dict(kind=kind, name=f"LoRA kohya file ({kind}, + text encoders)", path=f"{run}/{files.KOHYA_LORA_NAME}",
                       api="load_lora_weights", expect="equal")]
        # the form dcustom wrote before issue 19: the first text encoder without `text_model.`
        flat = {k.replace("text_encoder.text_model.", "text_encoder.", 1): v
                for k, v in load_file(str(out / run / files.DIFFUSERS_LORA_NAME)).items()}
        files.save_tensors(flat, out / run / "old_flat_te.safetensors", files.read_metadata(out / run / files.DIFFUSERS_LORA_NAME))
        cases += [dict(kind=kind, name=f"old flat text-encoder keys, plain diffusers ({kind})", path=f"{run}/old_flat_te.safetensors",
                       api="load_lora_weights", expect="fail_on_t4"),
                  dict(kind=kind, name=f"old flat text-encoder keys, dcustom's reader ({kind})", path=f"{run}/old_flat_te.safetensors",
                       api="dcustom_canonical_then_load_lora_weights", expect="equal")]
    train(LoraTrainConfig(model="tiny:sd15", data=data, train=loop("dora-sd15"), rank=4, alpha=8.0, dora=True,
                          validation_prompts=[]), progress=False)
    cases.append(dict(kind="sd15", name="DoRA diffusers file (sd15)", path=f"dora-sd15/{files.DIFFUSERS_LORA_NAME}",
                      api="load_lora_weights", expect="equal"))
    convert_lora(out / "dora-sd15", "kohya", out / "dora-sd15" / files.KOHYA_LORA_NAME)
    cases.append(dict(kind="sd15", name="DoRA kohya file (sd15): diffusers drops dora_scale", path=f"dora-sd15/{files.KOHYA_LORA_NAME}",
                      api="load_lora_weights", expect="differs", ref=f"dora-sd15/{files.DIFFUSERS_LORA_NAME}"))
    train(OftTrainConfig(model="tiny:sd15", data=data, train=loop("oft-sd15"), block_size=8, extract_rank=8,
                         write_full_diff=True, validation_prompts=[]), progress=False)
    cases.append(dict(kind="sd15", name="OFT full_diff (sd15): diffusers reads no .diff keys", path=f"oft-sd15/{files.FULL_DIFF_NAME}",
                      api="load_lora_weights", expect="fail_on_t4", ref="oft-sd15"))
    cases += [dict(kind="sd15", name="OFT peft folder (sd15), peft API", path="oft-sd15/unet", api="peft", expect="equal"),
              dict(kind="sd15", name="OFT extracted LoRA rank 8 (sd15)", path=f"oft-sd15/{files.EXTRACTED_LORA_NAME}",
                   api="load_lora_weights", expect="equal"),
              dict(kind="sd15", name="OFT extracted LoRA rank 8 vs the OFT itself (sd15)", path=f"oft-sd15/{files.EXTRACTED_LORA_NAME}",
                   api="load_lora_weights", expect="approx", ref="oft-sd15")]
    g = torch.Generator().manual_seed(5)
    save_embedding(out / "ti-sd15", TOKEN, {"text_encoder": torch.randn(2, 32, generator=g)}, "sd1", {"dcustom.family": "sd1"})
    save_embedding(out / "ti-sdxl", TOKEN, {"text_encoder": torch.randn(2, 32, generator=g),
                                            "text_encoder_2": torch.randn(2, 32, generator=g)}, "sdxl", {"dcustom.family": "sdxl"})
    cases += [dict(kind="sd15", name="embedding learned_embeds (sd15)", path="ti-sd15/learned_embeds.safetensors",
                   api="textual_inversion", expect="equal"),
              dict(kind="sd15", name="embedding A1111 file (sd15)", path="ti-sd15/a1111/toy-subject.safetensors",
                   api="textual_inversion", expect="equal"),
              dict(kind="sdxl", name="embedding clip_l/clip_g (sdxl)", path="ti-sdxl/learned_embeds.safetensors",
                   api="textual_inversion_sdxl", expect="equal")]
    for kind in ("sd15", "sdxl"):
        save_single_file(build_tiny_pipeline(kind), out / f"single-{kind}.safetensors")

    refs = {}
    for kind in ("sd15", "sdxl"):
        refs[f"base-{kind}"] = render(load_base(out / f"base-{kind}", kind))
    from dcustom.adapters.load import load_adapter

    for i, case in enumerate(cases):
        # The reference is what dcustom computes here for the file (or for `ref`); embeddings: diffusers' own
        # load_textual_inversion here (tests/test_embeddings.py shows dcustom's equals it).
        pipe = build_tiny_pipeline(case["kind"])
        pipe.set_progress_bar_config(disable=True)
        if case["api"].startswith("textual_inversion"):
            prompt = load_case(pipe, case, out)
        else:
            load_adapter(pipe, out / case.get("ref", case["path"]))
            prompt = PROMPT
        refs[f"case{i}"] = render(pipe, prompt)
    save_file({k: v.contiguous() for k, v in refs.items()}, str(out / "references.safetensors"))
    (out / "cases.json").write_text(json.dumps(cases, indent=1))
    print(f"prepared {len(cases)} cases in {out}")


def check(out: Path) -> int:
    """Render every case with diffusers here and compare with the reference; 1 when an expectation fails."""
    import diffusers
    import peft
    import torch
    import transformers
    from safetensors.torch import load_file

    refs = load_file(str(out / "references.safetensors"))
    cases = json.loads((out / "cases.json").read_text())
    print(f"transformers {transformers.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, "
          f"torch {torch.__version__}")
    bad = 0
    rows = []
    for kind in ("sd15", "sdxl"):
        d = (render(load_base(out / f"base-{kind}", kind)) - refs[f"base-{kind}"]).abs().max().item()
        rows.append((f"base pipeline ({kind}), no adapter", "equal", f"{d:.2e}", "ok" if d < TOL else "DIFFERS"))
        bad += d >= TOL
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    for kind in ("sd15", "sdxl"):
        cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
        kwargs = {} if kind == "sdxl" else dict(safety_checker=None, requires_safety_checker=False)
        single = cls.from_single_file(str(out / f"single-{kind}.safetensors"), config=str(out / f"base-{kind}"), **kwargs)
        base = load_base(out / f"base-{kind}", kind)
        worst = max((a.float() - b.float()).abs().max().item() for (ka, a), (kb, b) in
                    zip(sorted(single.unet.state_dict().items()), sorted(base.unet.state_dict().items())))
        te = max((single.text_encoder.state_dict()[k] - v).abs().max().item() for k, v in base.text_encoder.state_dict().items())
        d = max(worst, te)
        rows.append((f"single-file checkpoint ({kind}), from_single_file weights", "equal", f"{d:.2e}", "ok" if d == 0 else "DIFFERS"))
        bad += d != 0
    for i, case in enumerate(cases):
        pipe = load_base(out / f"base-{case['kind']}", case["kind"])
        try:
            prompt = load_case(pipe, case, out)
            d = (render(pipe, prompt) - refs[f"case{i}"]).abs().max().item()
            result = f"{d:.2e}"
            status = {"equal": d < TOL, "differs": d >= TOL, "approx": True, "fail_on_t4": False}[case["expect"]]
        except Exception as exc:  # noqa: BLE001 - a loader error is a result here
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:110]
            result, status = f"error: {type(exc).__name__}: {first}", case["expect"] == "fail_on_t4"
        rows.append((case["name"], case["expect"], result, "ok" if status else "UNEXPECTED"))
        bad += not status
    width = max(len(r[0]) for r in rows)
    for name, expect, result, status in rows:
        print(f"{name:{width}s}  {expect:10s}  {status:10s}  {result}")
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("prepare", "check"):
        sys.exit(__doc__)
    folder = Path(sys.argv[2])
    if sys.argv[1] == "prepare":
        prepare(folder)
    else:
        sys.exit(check(folder))
