"""Reward fine-tuning by backpropagation through sampling (AlignProp, DRaFT, DRaFT-K, DRaFT-LV).

One differentiable DDIM/CFG sampler (`sampler.RewardSampler`) over a stock diffusers pipeline,
named gradient policies deciding which UNet calls keep gradients (`policies`), a registry of
differentiable rewards with held-out counterparts (`rewards`; the `Reward` type in `base`), a LoRA on the UNet (`lora`), and a
trainer on the shared loop (`trainer.run`, `dcustom train reward`). The config lives in the
torch-free `config` module; this package imports nothing heavy.
"""
