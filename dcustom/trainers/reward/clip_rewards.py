"""CLIP-based rewards loaded from local weights, with a differentiable preprocessing path.

The image path is `resize (bilinear, antialiased) -> CLIP mean/std normalisation -> CLIP`, all
torch ops on the float images the sampler produced, so the gradient reaches the LoRA; models are
frozen (`requires_grad_(False)`) but never run under `no_grad`.

- `AestheticPredictor`: L2-normalised CLIP image embedding -> MLP in the LAION aesthetic layout
  (d-1024-128-64-16-1 with dropouts at indices 1, 3, 5), so a head saved from that layout (e.g.
  `sac+logos+ava1-l14-linearMSE.pth`, loaded with weights_only=True, or a .safetensors) fits.
- `ClipScore`: 100 x cosine between CLIP image and text embeddings (with PickScore's CLIPModel
  weights this is PickScore up to its logit scale).
"""

from __future__ import annotations

import json
from pathlib import Path

from dcustom.errors import DcustomError
from dcustom.trainers.reward.base import Reward

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _normaliser(folder: Path | None):
    """Mean/std from the folder's preprocessor_config.json when present, else OpenAI CLIP's."""
    mean, std = CLIP_MEAN, CLIP_STD
    if folder is not None and (folder / "preprocessor_config.json").is_file():
        cfg = json.loads((folder / "preprocessor_config.json").read_text())
        mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    return mean, std


def clip_pixels(images, size: int, mean, std):
    """[B,3,H,W] in [0,1] -> CLIP input, differentiably."""
    import torch
    import torch.nn.functional as F

    x = images.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def aesthetic_head(dim: int):
    """The LAION aesthetic MLP layout (module indices match its state-dict keys)."""
    import torch.nn as nn

    return nn.Sequential(
        nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
    )


class AestheticPredictor:
    """CLIP vision tower with projection + MLP head; `(images, prompts) -> [B]` scores."""

    def __init__(self, vision, head, mean=CLIP_MEAN, std=CLIP_STD):
        self.vision, self.head, self.mean, self.std = vision, head, mean, std
        for m in (vision, head):
            m.requires_grad_(False)
            m.eval()

    def __call__(self, images, prompts=None):
        pixels = clip_pixels(images, self.vision.config.image_size, self.mean, self.std)
        pixels = pixels.to(next(self.vision.parameters()).dtype)
        emb = self.vision(pixel_values=pixels).image_embeds.float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return self.head.to(emb.dtype)(emb).squeeze(-1)


def load_head(path: Path, dim: int):
    import torch

    head = aesthetic_head(dim)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    state = {k.removeprefix("layers."): v for k, v in state.items()}
    try:
        head.load_state_dict(state)
    except RuntimeError as exc:
        raise DcustomError(f"reward.options.head_path: {str(path)!r} does not fit the aesthetic MLP layout "
                           f"({dim}-1024-128-64-16-1): {str(exc).splitlines()[0]}") from None
    return head


def aesthetic_reward(clip_path, head_path, device="cpu") -> Reward:
    """Aesthetic predictor from a local CLIPVisionModelWithProjection folder and an MLP head file."""
    from transformers import CLIPVisionModelWithProjection

    if not clip_path or not head_path:
        raise DcustomError("reward.options: the aesthetic reward needs clip_path (a local CLIP vision folder) and "
                           "head_path (the MLP head, .safetensors or .pth).")
    folder, head_file = Path(clip_path), Path(head_path)
    for p, key in ((folder, "clip_path"), (head_file, "head_path")):
        if not p.exists():
            raise DcustomError(f"reward.options.{key}: {str(p)!r} does not exist.")
    vision = CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True).to(device)
    head = load_head(head_file, vision.config.projection_dim).to(device)
    mean, std = _normaliser(folder)
    predictor = AestheticPredictor(vision, head, mean, std)
    return Reward("aesthetic", predictor, modules=(vision, head))


class ClipScore:
    """100 x cos(image, text) with a local CLIPModel and its tokenizer."""

    def __init__(self, model, tokenizer, mean=CLIP_MEAN, std=CLIP_STD):
        self.model, self.tokenizer, self.mean, self.std = model, tokenizer, mean, std
        model.requires_grad_(False)
        model.eval()

    def __call__(self, images, prompts):
        import torch

        pixels = clip_pixels(images, self.model.config.vision_config.image_size, self.mean, self.std)
        device = pixels.device
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, return_tensors="pt",
                                max_length=min(self.tokenizer.model_max_length, 77))
        out = self.model(pixel_values=pixels.to(next(self.model.parameters()).dtype),
                         input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))
        img = out.image_embeds.float()
        txt = out.text_embeds.float()
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return 100.0 * torch.sum(img * txt, dim=-1)


def clip_score_reward(clip_path, device="cpu") -> Reward:
    from transformers import CLIPModel, CLIPTokenizer

    if not clip_path or not Path(clip_path).is_dir():
        raise DcustomError(f"reward.options.clip_path: {clip_path!r} is not a local CLIPModel folder (with its tokenizer).")
    model = CLIPModel.from_pretrained(str(clip_path), local_files_only=True).to(device)
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_path), local_files_only=True)
    mean, std = _normaliser(Path(clip_path))
    return Reward("clip_score", ClipScore(model, tokenizer, mean, std), modules=(model,))
