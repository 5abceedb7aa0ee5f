"""Training-free modules that hook stock diffusers pipelines.

Where things live: generic pieces in hooks (select, gate, restore), features (q/k/v store), injection
(record/inject processors, `injection()`), inversion (DDIM inversion, cache, replay), adain, images and
transfer (the content + style engine, `StyleTransferConfig`); one module per method with its paper,
its config and its context manager: style_injection (StyleID), attention_injection (MasaCtrl),
style_aligned (StyleAligned). Every registered style method has `run(cfg, pipe=None, cache=None,
on_step=None) -> result path`.

Public API (re-exported lazily, so importing this package does not import torch):

    stylize(pipe, content_img, style_img, StyleInjectionConfig())   content + style -> StyleResult
    invert(pipe, image, steps, layers=..., kinds=..., cache=...)     DDIM inversion (+ q/k/v recording)
    style_injection(pipe, content_inv, style_inv, layers)            StyleID around a sampling call
    attention_injection(pipe, roles=("style", "target"), steps=50)   MasaCtrl-style, reference in batch
    shared_attention(pipe, n_targets, steps)                         StyleAligned for one shared style
    generate_with_style_reference(pipe, prompt, style_img, seeds=[0])  text-to-image attending to a reference image
    latent_adain(z, z_style), token_adain(x, ref)                    AdaIN as functions
    attention_hooks(unet, layers, make_processor, gate)              the hook context manager itself
"""

_LAZY = {
    "stylize": "dcustom.pipelines.transfer:stylize",
    "StyleResult": "dcustom.pipelines.transfer:StyleResult",
    "invert": "dcustom.pipelines.inversion:invert",
    "sample_from": "dcustom.pipelines.inversion:sample_from",
    "InversionCache": "dcustom.pipelines.inversion:InversionCache",
    "style_injection": "dcustom.pipelines.style_injection:style_injection",
    "injection": "dcustom.pipelines.injection:injection",
    "replay_callback": "dcustom.pipelines.inversion:replay_callback",
    "attention_injection": "dcustom.pipelines.attention_injection:attention_injection",
    "shared_attention": "dcustom.pipelines.style_aligned:shared_attention",
    "style_aligned_generate": "dcustom.pipelines.style_aligned:style_aligned_generate",
    "generate_with_style_reference": "dcustom.pipelines.style_aligned:generate_with_style_reference",
    "latent_adain": "dcustom.pipelines.adain:latent_adain",
    "token_adain": "dcustom.pipelines.adain:token_adain",
    "adain": "dcustom.pipelines.adain:adain",
    "attention_hooks": "dcustom.pipelines.hooks:attention_hooks",
    "resolve_layers": "dcustom.pipelines.hooks:resolve_layers",
    "TimestepGate": "dcustom.pipelines.hooks:TimestepGate",
    "StyleTransferConfig": "dcustom.pipelines.transfer:StyleTransferConfig",
    "StyleInjectionConfig": "dcustom.pipelines.style_injection:StyleInjectionConfig",
    "AttentionInjectionConfig": "dcustom.pipelines.attention_injection:AttentionInjectionConfig",
}

from dcustom.lazy import lazy_exports  # noqa: E402

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
