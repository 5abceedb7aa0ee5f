"""BOFT with real butterfly factors without peft's CUDA extension: dcustom's torch block-diagonal kernel
matches torch.block_diag + autograd, a factor-2 adapter trains on tiny SD1.x, its rotations stay
orthogonal, and save -> fresh load reproduces the output with the factor intact."""

from __future__ import annotations

import json

import pytest
from image_helpers import write_noise_images
import torch

from dcustom.adapters.boft_kernel import TORCH_KERNEL, boft_kernel_in_use, ensure_boft_kernel
from dcustom.adapters.files import merged_linear_weights
from dcustom.adapters.load import load_adapter
from dcustom.data import DataConfig
from dcustom.models import load_pipeline
from dcustom.trainers.adapter.config import BoftTrainConfig
from dcustom.trainers.adapter.trainer import train
from dcustom.trainers.loop import LoopConfig

PROMPT = "a photo of sks dog"


def render(pipe):
    pipe.unet.eval()
    g = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=2, generator=g, output_type="pt", width=32, height=32).images


def boft_layers(unet):
    from peft.tuners.boft.layer import BOFTLayer

    return {n: m for n, m in unet.named_modules() if isinstance(m, BOFTLayer)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("boft")
    images = write_noise_images(root / "imgs", [(32, 32)] * 2, seed=2)
    pipe = load_pipeline("tiny:sd15", device="cpu")
    base_out = render(pipe)
    frozen = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    cfg = BoftTrainConfig(model="tiny:sd15", data=DataConfig(images=str(images), instance_prompt=PROMPT, resolution=32),
                          train=LoopConfig(output_dir=str(root / "run"), steps=2, lr=5e-2, device="cpu", checkpoint_every=0),
                          block_size=4, butterfly_factor=2, extract_rank=0, validation_prompts=[], sample_steps=2)
    result = train(cfg, pipe=pipe, progress=False)
    return root, pipe, result, base_out, frozen


def test_kernel_matches_block_diag_and_its_adjoint():
    blocks = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    out = TORCH_KERNEL.forward(blocks)[0]
    reference = torch.stack([torch.block_diag(*b) for b in blocks])
    assert out.shape == (2, 12, 12) and torch.equal(out, reference)
    grad = torch.randn_like(out)
    leaf = blocks.clone().requires_grad_()
    torch.stack([torch.block_diag(*b) for b in leaf]).backward(grad)
    assert torch.equal(TORCH_KERNEL.backward(grad, blocks)[0], leaf.grad)

    ensure_boft_kernel()
    from peft.tuners.boft.layer import FastBlockDiag  # peft's autograd Function, now backed by our kernel

    small = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(FastBlockDiag.apply, (small,), eps=1e-6, atol=1e-8)


def test_install_is_idempotent_and_never_replaces_a_working_extension(monkeypatch):
    import peft.tuners.boft.layer as boft_layer

    assert ensure_boft_kernel() == ensure_boft_kernel() == boft_kernel_in_use()
    compiled = object()  # stands for a built fbd_cuda module already in peft's cache
    monkeypatch.setattr(boft_layer, "_FBD_CUDA", compiled)
    assert ensure_boft_kernel() == "peft-cuda" and boft_layer._FBD_CUDA is compiled


def test_factor_two_trains_with_frozen_base(trained):
    _, pipe, result, base_out, frozen = trained
    assert result.status == "finished" and result.method.effective_butterfly_factor == 2
    layers = boft_layers(pipe.unet)
    assert layers and all(m.boft_R["default"].shape[0] == 2 for m in layers.values())
    assert any(m.boft_R["default"].abs().max() > 0 for m in layers.values())  # initialised at 0, moved
    for name, p in pipe.unet.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[name.replace(".base_layer", "")]), name
    assert (render(pipe) - base_out).abs().max() > 1e-3
    saved = json.loads((result.run_dir / "unet" / "adapter_config.json").read_text())
    assert saved["boft_n_butterfly_factor"] == 2


def test_merged_weight_is_rotation_times_scale(trained):
    _, pipe, _, _, _ = trained
    layers = boft_layers(pipe.unet)
    merged = merged_linear_weights(pipe.unet)
    worst = 0.0
    for name, layer in layers.items():
        with torch.no_grad():
            rotation, scale = layer.get_delta_weight("default")
        eye = torch.eye(rotation.shape[0])
        worst = max(worst, (rotation.T @ rotation - eye).abs().max().item())
        base, weight = merged[name]
        assert torch.allclose(weight, scale * (base @ rotation.T), atol=1e-6), name  # W' = diag(s) W R^T
        assert (rotation - eye).abs().max() > 0, name  # a real rotation, not the identity
    assert worst < 1e-5, worst


def test_save_and_fresh_load_reproduce_output_with_two_factors(trained, monkeypatch):
    import peft.tuners.boft.layer as boft_layer

    root, pipe, result, _, _ = trained
    monkeypatch.setattr(boft_layer, "_FBD_CUDA", None)  # as in a fresh process: load_adapter must install the kernel
    fresh = load_pipeline("tiny:sd15", device="cpu")
    load_adapter(fresh, result.run_dir)
    assert all(m.boft_R["adapter_0"].shape[0] == 2 for m in boft_layers(fresh.unet).values())
    assert (render(fresh) - render(pipe)).abs().max().item() == 0.0
