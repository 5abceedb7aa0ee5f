"""The two judges: small image classifiers with one head per attribute (see grammar.HEADS).

`J_train` ("train") may be used by training methods, e.g. as a reward; `J_eval` ("eval") only ever
reports. They differ in architecture (batch-norm ReLU CNN vs group-norm SiLU CNN with max pooling),
seed, training images and augmentations, so they fail differently on generated images.

    judge = load_judge("eval")
    out = judge.predict(images)          # {"shape": {"labels": [...], "probs": Tensor[N, C]}, ...}
    feats = judge.features(images)       # Tensor[N, D], penultimate layer (toy-FID, subject similarity)
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcustom.toyworld.grammar import HEADS, JUDGE_RANGES

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
JUDGE_KINDS = ("train", "eval")


@dataclass(frozen=True)
class JudgeRecipe:
    arch: str
    seed: int
    data_seed: int
    train_images: int
    epochs: int
    lr: float
    noise: float  # max std of added Gaussian noise (augmentation)
    blur: float  # probability of a 3x3 blur (augmentation)
    shift: int  # max random translation in pixels (augmentation)


RECIPES = {
    "train": JudgeRecipe("bn_relu_cnn", seed=11, data_seed=100_000, train_images=9_000, epochs=5, lr=2e-3,
                         noise=0.06, blur=0.3, shift=0),
    "eval": JudgeRecipe("gn_silu_maxpool_cnn", seed=23, data_seed=900_000, train_images=8_000, epochs=5, lr=2e-3,
                        noise=0.04, blur=0.0, shift=2),
}


def _heads_module(dim: int) -> nn.ModuleDict:
    return nn.ModuleDict({h: nn.Linear(dim, len(classes)) for h, classes in HEADS.items()})


class BnReluCnn(nn.Module):
    """J_train: 3x3 convs with batch norm and ReLU, a strided then max-pooled pyramid; features from a
    global max pool (local evidence such as corners and points) plus a 2x2 average pool (coarse layout)."""

    feature_dim = 64

    def __init__(self):
        super().__init__()

        def block(c_in, c_out, stride=1):
            return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(
            *block(3, 16), *block(16, 24, 2),  # 32
            *block(24, 32), nn.MaxPool2d(2),  # 16
            *block(32, 64), nn.MaxPool2d(2),  # 8
            *block(64, 96),
        )
        self.neck = nn.Sequential(nn.Linear(96 * 5, self.feature_dim), nn.LeakyReLU(0.1))  # no dead feature units
        self.heads = _heads_module(self.feature_dim)

    def embed(self, x):
        h = self.body(x)
        pooled = torch.cat([h.amax(dim=(2, 3)), F.adaptive_avg_pool2d(h, 2).flatten(1)], dim=1)
        return self.neck(pooled)


class GnSiluMaxpoolCnn(nn.Module):
    """J_eval: 5x5 then 3x3 convs with group norm and SiLU, max-pool downsampling, avg+max pooled, 96-d features."""

    feature_dim = 96

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 5, 1, 2), nn.GroupNorm(4, 16), nn.SiLU(), nn.MaxPool2d(2),  # 32
            nn.Conv2d(16, 32, 3, 1, 1), nn.GroupNorm(8, 32), nn.SiLU(), nn.MaxPool2d(2),  # 16
            nn.Conv2d(32, 64, 3, 1, 1), nn.GroupNorm(8, 64), nn.SiLU(), nn.MaxPool2d(2),  # 8
            nn.Conv2d(64, 96, 3, 1, 1), nn.GroupNorm(8, 96), nn.SiLU(),
        )
        self.neck = nn.Sequential(nn.Linear(192, self.feature_dim), nn.SiLU())
        self.heads = _heads_module(self.feature_dim)

    def embed(self, x):
        h = self.body(x)
        return self.neck(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1))


ARCHS = {"bn_relu_cnn": BnReluCnn, "gn_silu_maxpool_cnn": GnSiluMaxpoolCnn}


def to_tensor(images) -> torch.Tensor:
    """PIL image(s), uint8 arrays or a float tensor in [0, 1] -> float tensor [N, 3, 64, 64] in [0, 1]."""
    if isinstance(images, torch.Tensor):
        x = images if images.dim() == 4 else images[None]
    else:
        if not isinstance(images, (list, tuple)):
            images = [images]
        if all(isinstance(im, torch.Tensor) for im in images):
            return to_tensor(torch.stack(list(images)))
        arrays = [np.asarray(im.convert("RGB") if hasattr(im, "convert") else im, dtype=np.uint8) for im in images]
        if len({a.shape for a in arrays}) > 1:  # mixed sizes: bring each to 64x64 first
            return torch.cat([to_tensor([a]) for a in arrays])
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    x = x.float()
    if x.shape[-2:] != (64, 64):
        x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    return x


class Judge(nn.Module):
    """A trained judge: `forward(x in [0,1]) -> {head: logits}` (differentiable), plus predict/features."""

    def __init__(self, arch: str, kind: str = "", meta: dict | None = None):
        super().__init__()
        self.arch, self.kind, self.meta = arch, kind, dict(meta or {})
        self.net = ARCHS[arch]()
        self.heads = HEADS

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.net.embed((x - 0.5) / 0.25)
        return {h: head(z) for h, head in self.net.heads.items()}

    def _batches(self, images, batch: int = 256):
        x = to_tensor(images)
        dev = next(self.parameters()).device
        for i in range(0, len(x), batch):
            yield x[i:i + batch].to(dev)

    @torch.no_grad()
    def predict(self, images) -> dict[str, dict]:
        """{head: {"labels": [class names], "probs": Tensor[N, C] (cpu)}} for each head."""
        probs: dict[str, list] = {h: [] for h in HEADS}
        for xb in self._batches(images):
            for h, logits in self(xb).items():
                probs[h].append(logits.softmax(-1).float().cpu())
        out = {}
        for h, chunks in probs.items():
            p = torch.cat(chunks)
            out[h] = {"labels": [HEADS[h][i] for i in p.argmax(-1).tolist()], "probs": p}
        return out

    @torch.no_grad()
    def features(self, images) -> torch.Tensor:
        """Penultimate-layer features, Tensor[N, D] on cpu (float32)."""
        return torch.cat([self.net.embed((xb - 0.5) / 0.25).float().cpu() for xb in self._batches(images)])


def weights_path(kind: str) -> Path:
    return WEIGHTS_DIR / f"judge_{kind}.safetensors"


_CACHE: dict[str, Judge] = {}


def load_judge(kind: str = "eval", device: str = "cpu", path: str | Path | None = None) -> Judge:
    """The shipped judge "train" (J_train) or "eval" (J_eval), in eval mode, cached per kind and device."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from dcustom.errors import DcustomError

    if kind not in JUDGE_KINDS:
        raise DcustomError(f"judge {kind!r} is not known; accepted: train, eval.")
    key = f"{kind}:{device}:{path}"
    if key in _CACHE:
        return _CACHE[key]
    file = Path(path) if path else weights_path(kind)
    if not file.is_file():
        raise DcustomError(f"judge weights {str(file)!r} are missing; train them with 'dcustom toyworld train-judges'.")
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
    judge = Judge(meta.get("arch", RECIPES[kind].arch), kind, meta)
    judge.load_state_dict(load_file(str(file)))
    judge.eval().requires_grad_(False).to(device)
    _CACHE[key] = judge
    return judge


# ---------------------------------------------------------------- training
def labels_tensor(scenes) -> dict[str, torch.Tensor]:
    """Per-head class indices, -1 where a head does not apply."""
    out = {}
    for h, classes in HEADS.items():
        out[h] = torch.tensor([classes.index(s.labels()[h]) if s.labels()[h] is not None else -1 for s in scenes])
    return out


def render_dataset(n: int, seed: int, split: str = "judge"):
    from dcustom.toyworld.render import render_samples

    samples = render_samples(n, seed, split, JUDGE_RANGES)
    return to_tensor([s[0] for s in samples]), labels_tensor([s[2] for s in samples])


def _augment(x: torch.Tensor, recipe: JudgeRecipe, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    if recipe.blur > 0:
        blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
        pick = (torch.rand(n, 1, 1, 1, generator=gen) < recipe.blur).float()
        x = pick * blurred + (1 - pick) * x
    if recipe.shift > 0:
        dx, dy = (int(v) for v in torch.randint(-recipe.shift, recipe.shift + 1, (2,), generator=gen))
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    gain = 1 + 0.08 * (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1)
    x = (x - 0.5) * gain + 0.5
    x = x + torch.randn(x.shape, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * recipe.noise
    return x.clamp(0, 1)


def head_accuracy(judge: Judge, x: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-head accuracy over the images where the head applies."""
    judge.eval()
    preds = {h: [] for h in HEADS}
    with torch.no_grad():
        for i in range(0, len(x), 512):
            for h, logits in judge(x[i:i + 512]).items():
                preds[h].append(logits.argmax(-1))
    acc = {}
    for h in HEADS:
        p, y = torch.cat(preds[h]), labels[h]
        mask = y >= 0
        acc[h] = float((p[mask] == y[mask]).float().mean()) if mask.any() else float("nan")
    return acc


def train_judge(kind: str, out: str | Path | None = None, images: int | None = None, epochs: int | None = None,
                check_images: int = 2000, log=print) -> dict:
    """Train judge `kind` on CPU from its recipe; writes safetensors (temp name, then rename); returns metrics."""
    from safetensors.torch import save_file

    recipe = RECIPES[kind]
    n = images or recipe.train_images
    n_epochs = epochs or recipe.epochs
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    t0 = time.time()
    x, y = render_dataset(n, recipe.data_seed)
    log(f"[judge {kind}] rendered {n} images in {time.time() - t0:.0f}s")
    judge = Judge(recipe.arch, kind)
    opt = torch.optim.AdamW(judge.parameters(), lr=recipe.lr, weight_decay=1e-4)
    batch = 128
    steps = n_epochs * (n // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(recipe.seed)
    step = 0
    for epoch in range(n_epochs):
        judge.train()
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n - batch + 1, batch):
            idx = order[i:i + batch]
            logits = judge(_augment(x[idx], recipe, gen))
            loss = sum(F.cross_entropy(logits[h], y[h][idx], ignore_index=-1) for h in HEADS)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            total += float(loss.detach())
        log(f"[judge {kind}] epoch {epoch + 1}/{n_epochs} loss {total / max(1, n // batch):.4f} ({time.time() - t0:.0f}s)")
    fresh_x, fresh_y = render_dataset(check_images, recipe.data_seed + 7_777_777)
    acc = head_accuracy(judge, fresh_x, fresh_y)
    log(f"[judge {kind}] fresh-render accuracy: " + ", ".join(f"{h} {a:.4f}" for h, a in acc.items()))
    file = Path(out) if out else weights_path(kind)
    file.parent.mkdir(parents=True, exist_ok=True)
    meta = {"arch": recipe.arch, "kind": kind, "recipe": json.dumps(recipe.__dict__), "heads": json.dumps(HEADS),
            "fresh_accuracy": json.dumps(acc), "train_seconds": f"{time.time() - t0:.0f}"}
    tmp = file.with_name(file.name + ".tmp")
    state = {k: v.detach().contiguous() for k, v in judge.state_dict().items()}
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(file)
    _CACHE.clear()
    return {"kind": kind, "path": str(file), "fresh_accuracy": acc, "seconds": time.time() - t0,
            "parameters": sum(p.numel() for p in judge.parameters())}
