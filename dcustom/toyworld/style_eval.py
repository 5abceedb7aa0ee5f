"""The style-transfer protocol of the results page, transposed to the toy world (`dcustom eval style`).

StyleID's evaluation (Chung et al., CVPR 2024) stylizes content photos with style paintings and reports
content fidelity (LPIPS / CFSD to the content) and style fidelity (Gram/ArtFID-style statistics to the
style). Here: content renders of the base split, style renders of the held-out styles (mosaic, sketch,
neon), and two measurable stand-ins:

- content kept: J_eval names the content's shape in the result (colour-independent: the style may and
  should change the colour), plus a layout correlation (luminance edge maps, 16x16, no bar);
- style distance: RGB mean/std and the Gram matrix of J_eval's first conv block, result vs style image,
  as a fraction of the content image's own distance to the style image (the bar: at most one half).

Every method runs on the same pairs with a fresh inversion cache per pair (uncached) and again with a
warm one (cached: both inversions are hits, and the image must come out the same).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

METHODS = ("style_id", "style_id_tone", "style_id_concat", "attention_injection", "adain", "style_aligned")
DEFAULT_METHODS = ("style_id", "style_id_tone", "attention_injection", "adain", "style_aligned")
DESCRIPTIONS = {
    "style_id": "StyleID (paper defaults: γ 0.75, T 1.5, style K/V into late decoder self-attention, AdaIN z_T)",
    "style_id_tone": "StyleID, toy-world fix: mode concat, the latent AdaIN moved to 75 % of the steps and mean only",
    "style_id_concat": "StyleID with mode concat (attend to [own; style] K/V)",
    "attention_injection": "attention injection (MasaCtrl: K/V from step 4/50, no AdaIN)",
    "adain": "AdaIN of the inverted latent only (no attention injection)",
    "style_aligned": "StyleAligned shared attention from the content's caption (dcustom generate --style-ref)",
}


# StyleID's settings that pass on builtin:toy (docs/results.md, "Training-free style", says why each).
TONE = {"mode": "concat", "adain_at": 0.75, "adain_std": False}


def style_pairs(n: int = 50, content_seed: int = 7, style_seed: int = 11):
    """n (content image, content scene, caption, style image, style name): base-split contents, styles cycling."""
    from dcustom.toyworld.grammar import STYLES
    from dcustom.toyworld.render import render_samples, render_style

    contents = render_samples(n, seed=content_seed, split="base")
    per_style = -(-n // len(STYLES))
    styles = {s: render_style(s, min(4, per_style), seed=style_seed) for s in STYLES}
    out = []
    for i, (image, caption, scene) in enumerate(contents):
        name = STYLES[i % len(STYLES)]
        out.append((image, scene, caption, styles[name][(i // len(STYLES)) % len(styles[name])][0], name))
    return out


def style_statistics(images, judge):
    """RGB channel mean/std and the Gram matrix of the judge's first conv block (scaled to comparable sizes)."""
    import torch

    from dcustom.toyworld.judges import to_tensor

    x = to_tensor(images)
    with torch.no_grad():
        h = judge.net.body[:3]((x - 0.5) / 0.25).flatten(2)  # conv -> norm -> activation: 16 texture channels
    gram = (h @ h.transpose(1, 2)) / h.shape[-1]
    colour = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)
    return torch.cat([colour * 4, gram.flatten(1) / 4], 1)


def edge_layout(images):
    """Luminance gradient magnitude, average-pooled to 16x16 and standardized per image (colour-independent)."""
    import torch

    from dcustom.toyworld.judges import to_tensor

    x = to_tensor(images).mean(1, keepdim=True)
    gx, gy = x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]
    mag = torch.nn.functional.pad(gx.abs(), (0, 1)) + torch.nn.functional.pad(gy.abs(), (0, 0, 0, 1))
    e = torch.nn.functional.adaptive_avg_pool2d(mag, 16).flatten(1)
    return (e - e.mean(1, keepdim=True)) / e.std(1, keepdim=True).clamp_min(1e-6)


def _stylize(method: str, pipe, content, caption, style, steps: int, cache, seed: int):
    from dcustom.pipelines.attention_injection import AttentionInjectionConfig
    from dcustom.pipelines.style_aligned import generate_with_style_reference
    from dcustom.pipelines.style_injection import StyleInjectionConfig
    from dcustom.pipelines.transfer import stylize

    if method == "style_aligned":
        return generate_with_style_reference(pipe, caption, style, seeds=[seed], steps=steps, guidance=5.0,
                                             cache=cache).images[0]
    cfg = {"style_id": lambda: StyleInjectionConfig(steps=steps),
           "style_id_tone": lambda: StyleInjectionConfig(steps=steps, **TONE),
           "style_id_concat": lambda: StyleInjectionConfig(steps=steps, mode="concat"),
           "attention_injection": lambda: AttentionInjectionConfig(steps=steps),
           "adain": lambda: StyleInjectionConfig(steps=steps, inject_attention=False)}[method]()
    return stylize(pipe, content, style, cfg, cache=cache).image


def evaluate_style(pipe, methods=DEFAULT_METHODS, pairs: int = 50, steps: int = 20, cached_pairs: int = 10,
                   psnr_steps=(10, 25, 50), psnr_images: int = 4, out_dir=None, on_stage=None) -> dict:
    """Every method on the same `pairs`; the DDIM round trip PSNR; images and style.json under out_dir."""
    import numpy as np
    import torch

    from dcustom.pipelines.inversion import InversionCache
    from dcustom.toyworld.judges import load_judge

    say = on_stage or (lambda _m: None)
    judge = load_judge("eval")
    data = style_pairs(pairs)
    contents, styles = [d[0] for d in data], [d[3] for d in data]
    before = (style_statistics(contents, judge) - style_statistics(styles, judge)).norm(dim=1)
    report = {"pairs": pairs, "steps": steps, "threads": torch.get_num_threads(), "methods": {},
              "style_distance_content": float(before.mean())}
    results = {}
    for method in methods:
        say(f"{method}: {pairs} pairs, uncached inversions")
        images, seconds = [], []
        for i, (content, _scene, caption, style, _name) in enumerate(data):
            t0 = time.process_time()
            images.append(_stylize(method, pipe, content, caption, style, steps, InversionCache(), seed=i))
            seconds.append(time.process_time() - t0)
        cache, cached_seconds, same = InversionCache(), [], True
        for i, (content, _scene, caption, style, _name) in enumerate(data[:cached_pairs]):
            _stylize(method, pipe, content, caption, style, steps, cache, seed=i)  # fills the cache
            t0 = time.process_time()
            again = _stylize(method, pipe, content, caption, style, steps, cache, seed=i)
            cached_seconds.append(time.process_time() - t0)
            same &= bool(np.array_equal(np.asarray(again), np.asarray(images[i])))
        figures = score(images, data, judge)
        report["methods"][method] = {
            "description": DESCRIPTIONS[method], **figures,
            "bars": {"content_kept >= 0.90": figures["content_kept"] >= 0.90,
                     "style_distance_ratio <= 0.5": figures["style_distance_ratio"] <= 0.5},
            "cpu_s_per_pair_uncached": float(np.mean(seconds)),
            "cpu_s_per_pair_cached": float(np.mean(cached_seconds)) if cached_seconds else None,
            "cached_equals_uncached": same}
        results[method] = images
    say("references: the renderer's ideal transfer, and it through the autoencoder")
    report["references"] = references(pipe, data, judge)
    say("DDIM inversion round trip PSNR")
    report["inversion_psnr_db"] = inversion_psnr(pipe, psnr_steps, psnr_images)
    if out_dir is not None:
        report["files"] = save(report, data, results, out_dir)
    return report


def score(images, data, judge) -> dict:
    """content kept (J_eval names the content's shape), layout correlation, style distance ratio, overall and per style."""
    import torch

    contents, styles = [d[0] for d in data], [d[3] for d in data]
    s_style = style_statistics(styles, judge)
    before = (style_statistics(contents, judge) - s_style).norm(dim=1)
    after = (style_statistics(images, judge) - s_style).norm(dim=1)
    pred = judge.predict(images)
    kept = torch.tensor([p == d[1].labels()["shape"] for p, d in zip(pred["shape"]["labels"], data)], dtype=torch.float)
    named = torch.tensor([p == d[4] for p, d in zip(pred["style"]["labels"], data)], dtype=torch.float)
    layout = (edge_layout(images) * edge_layout(contents)).mean(1)

    def figures(rows):
        return {"content_kept": float(kept[rows].mean()), "layout_correlation": float(layout[rows].mean()),
                "style_distance": float(after[rows].mean()),
                "style_distance_ratio": float(after[rows].mean() / before[rows].mean()),
                "style_named": float(named[rows].mean())}

    out = figures(list(range(len(data))))
    out["per_style"] = {name: figures([i for i, d in enumerate(data) if d[4] == name])
                        for name in dict.fromkeys(d[4] for d in data)}
    return out


def references(pipe, data, judge) -> dict:
    """What the measure gives an ideal transfer: the content scene drawn in the style by the renderer
    itself, as rendered and after the model's autoencoder (the best a latent method can hope for)."""
    from dataclasses import replace

    from dcustom.pipelines.inversion import decode_latents, encode_image
    from dcustom.toyworld.render import render_scene

    ideal = [render_scene(replace(d[1], style=d[4])) for d in data]
    through_vae = [decode_latents(pipe, encode_image(pipe, im, im.height, im.width))[0] for im in ideal]
    return {"ideal": score(ideal, data, judge), "ideal_through_vae": score(through_vae, data, judge)}


def inversion_psnr(pipe, steps_list=(10, 25, 50), n: int = 4) -> dict:
    """PSNR of invert -> sample against the VAE's own reconstruction of the same renders (the DDIM round trip alone)."""
    import numpy as np

    from dcustom.pipelines.inversion import decode_latents, invert, sample_from
    from dcustom.toyworld.render import render_samples

    images = [im for im, _, _ in render_samples(n, seed=5, split="base")]
    out = {}
    for steps in steps_list:
        values = []
        for im in images:
            inv = invert(pipe, im, steps=steps)
            a = np.asarray(decode_latents(pipe, sample_from(pipe, inv.zT, steps))[0], np.float64)
            b = np.asarray(decode_latents(pipe, inv.z0)[0], np.float64)
            values.append(10 * np.log10(255.0 ** 2 / max(((a - b) ** 2).mean(), 1e-10)))
        out[str(steps)] = float(np.mean(values))
    return out


def save(report: dict, data, results: dict, out_dir) -> dict:
    """style.json; per method a grid (content | style | result, first 8 pairs); the content x style grid."""
    from dcustom.toyworld.render import grid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / "style.json")}
    for method, images in results.items():
        path = out / f"{method}.png"
        grid([im for i in range(min(8, len(images))) for im in (data[i][0], data[i][3], images[i])], columns=3).save(path)
        files[method] = str(path)
    # Content x style: the first four contents, one row each, with every method beside them.
    columns = 2 + len(results)
    cells = []
    for i in range(min(6, len(data))):
        cells += [data[i][0], data[i][3]] + [results[m][i] for m in results]
    grid(cells, columns=columns).save(out / "methods.png")
    files["methods_grid"] = str(out / "methods.png")
    tmp = out / ".style.json.tmp"
    tmp.write_text(json.dumps({**report, "files": files}, indent=2))
    tmp.replace(out / "style.json")
    return files


def content_style_grid(pipe, n_contents: int = 4, steps: int = 20, method: str = "style_id_tone", out=None):
    """A content x style grid drawn by the model: row 0 the style images, column 0 the contents."""
    from PIL import Image

    from dcustom.pipelines.inversion import InversionCache
    from dcustom.toyworld.grammar import STYLES
    from dcustom.toyworld.render import grid, render_samples, render_style

    contents = render_samples(n_contents, seed=3, split="base")
    styles = [render_style(s, 1, seed=11)[0][0] for s in STYLES]
    cache = InversionCache()
    blank = Image.new("RGB", styles[0].size, (255, 255, 255))
    cells = [blank] + styles
    for image, caption, _scene in contents:
        cells.append(image)
        cells += [_stylize(method, pipe, image, caption, s, steps, cache, seed=0) for s in styles]
    picture = grid(cells, columns=1 + len(styles))
    if out is not None:
        picture.save(out)
    return picture
