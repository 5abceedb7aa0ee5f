"""Reward backprop (AlignProp / DRaFT) on tiny pipelines: gradient flow, policies, checkpointing,
frozen weights, SDXL conditioning, KL, LoRA scale and file round trip."""

from __future__ import annotations

import pytest
import torch

from dcustom.errors import DcustomError
from dcustom.models import load_pipeline
from dcustom.trainers.reward.gradcheck import check_reward_gradient, gradient_report
from dcustom.trainers.reward.lora import add_reward_lora, lora_scale, save_reward_lora
from dcustom.trainers.reward.policies import (FullChain, LastK, LowVariance, NoGrad, PerStepRandom,
                                              PerTrajectoryRandom, make_policy)
from dcustom.trainers.reward.rewards import build_reward, colourfulness
from dcustom.trainers.reward.sampler import RewardSampler

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def sd15():
    pipe = load_pipeline("tiny:sd15", device="cpu", dtype="fp32")
    params = add_reward_lora(pipe.unet)
    return pipe, params


@pytest.fixture
def perturbed(sd15):
    """LoRA with a non-zero B (as after a few updates), restored after the test."""
    pipe, params = sd15
    saved = {k: v.detach().clone() for k, v in params.items()}
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in params.items():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    yield pipe, params
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
            p.grad = None


def _sampler(pipe, **kw):
    """Small and cheap: 32x32 images (16x16 latents), 2 steps; CFG on (it is the usual path)."""
    kw.setdefault("steps", 2)
    kw.setdefault("guidance_scale", 3.0)
    kw.setdefault("height", 32)
    kw.setdefault("width", 32)
    return RewardSampler(pipe, **kw)


class CallCounter:
    """Forward hook on the UNet: per call, was grad enabled and is the output in the graph?"""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        out = output[0] if isinstance(output, tuple) else output.sample
        self.calls.append((torch.is_grad_enabled(), out.requires_grad))

    @property
    def in_graph(self):
        return sum(1 for enabled, req in self.calls if enabled and req)

    def remove(self):
        self.handle.remove()


def test_policy_sets_match_their_definitions():
    assert FullChain().grad_steps(5) == {0, 1, 2, 3, 4}
    assert LastK(k=2).grad_steps(5) == {3, 4}
    assert LastK(k=9).grad_steps(5) == {0, 1, 2, 3, 4}
    assert LowVariance(lv_copies=3).grad_steps(5) == frozenset() and LowVariance(lv_copies=3).lv_copies == 3
    g = torch.Generator().manual_seed(0)
    per_step = [len(PerStepRandom().grad_steps(50, g)) for _ in range(400)]
    assert PerStepRandom().expected_grad_calls(50) == pytest.approx(25.0)
    assert abs(sum(per_step) / len(per_step) - 25.0) < 1.0  # AlignProp v1: step i in S w.p. (i+1)/51
    traj = [PerTrajectoryRandom().grad_steps(50, g) for _ in range(400)]
    assert all(s == set(range(min(s), 50)) and 1 <= min(s) <= 49 for s in traj)  # contiguous, boundary in [1, 49]
    assert abs(sum(len(s) for s in traj) / len(traj) - 8.0) < 1.0  # N(42, 5) boundary: K about 8
    with pytest.raises(DcustomError, match="policy.name: 'draft_q' is not known; accepted: draft, draft_k"):
        make_policy("draft_q")


@pytest.mark.parametrize("policy", [FullChain(), LastK(k=2), LowVariance(lv_copies=2), PerStepRandom(),
                                    PerTrajectoryRandom()], ids=lambda p: p.name)
def test_each_policy_puts_exactly_its_unet_calls_in_the_graph(sd15, policy):
    pipe, _ = sd15
    sampler = _sampler(pipe, steps=4)
    cond = sampler.encode(PROMPTS[:1])
    x_T, _ = sampler.initial_noise(1, torch.Generator().manual_seed(0))
    expected = sorted(policy.grad_steps(4, torch.Generator().manual_seed(3)))
    counter = CallCounter(pipe.unet)
    try:
        result = sampler.rollout(cond, policy, generator=torch.Generator().manual_seed(3), x_T=x_T)
    finally:
        counter.remove()
    want = policy.lv_copies if policy.lv_copies else len(expected)
    assert result.grad_steps == expected
    assert counter.in_graph == want == result.grad_calls
    assert len(counter.calls) == 4 + policy.lv_copies  # no call was added or dropped
    # the calls in the graph are exactly the policy's steps, in sampling order
    flags = [enabled and req for enabled, req in counter.calls]
    assert [i for i, f in enumerate(flags[:4]) if f] == expected
    assert result.images.requires_grad == (want > 0)


def test_reward_gradient_reaches_every_lora_parameter(perturbed):
    pipe, params = perturbed
    sampler = _sampler(pipe)
    result = sampler.rollout(sampler.encode(PROMPTS), FullChain(), generator=torch.Generator().manual_seed(0))
    scores = colourfulness(result.images)
    assert scores.shape == (2,) and scores.requires_grad
    (-scores.mean()).backward()
    report = gradient_report(params)
    assert report.missing == [] and report.zero == []
    assert len(report.nonzero) == len(params) == 96
    assert report.norm > 0


def test_at_zero_init_only_b_gets_gradient_and_the_check_passes(sd15):
    pipe, params = sd15
    sampler = _sampler(pipe)
    report = check_reward_gradient(sampler, build_reward("colourfulness"), PROMPTS[:1], params)
    assert all("lora_B" in n for n in report.nonzero) and len(report.nonzero) == 48
    assert all("lora_A" in n for n in report.zero)  # B = 0 makes dL/dA = 0 exactly


def test_gradient_check_catches_no_grad_scorer_uint8_scorer_and_no_grad_decoder(sd15, monkeypatch):
    pipe, params = sd15
    sampler = _sampler(pipe)
    base = build_reward("colourfulness")

    @torch.no_grad()
    def no_grad_scorer(images, prompts):
        return base(images, prompts)

    def uint8_scorer(images, prompts):
        return colourfulness((images * 255).to(torch.uint8).float() / 255)

    for scorer in (no_grad_scorer, uint8_scorer):
        with pytest.raises(DcustomError, match="gives no gradient to the LoRA weights"):
            check_reward_gradient(sampler, scorer, PROMPTS[:1], params)

    plain_decode = sampler.decode
    monkeypatch.setattr(sampler, "decode", torch.no_grad()(plain_decode))
    with pytest.raises(DcustomError, match="the scorer or the VAE decode runs under torch.no_grad"):
        check_reward_gradient(sampler, base, PROMPTS[:1], params)


def test_checkpointed_and_plain_gradients_agree_in_fp32(perturbed):
    pipe, params = perturbed
    grads = []
    for checkpointing in (True, False):
        sampler = _sampler(pipe, checkpointing=checkpointing, eta=0.5)
        result = sampler.rollout(sampler.encode(PROMPTS[:1]), FullChain(), generator=torch.Generator().manual_seed(0))
        (-colourfulness(result.images).mean()).backward()
        grads.append({k: p.grad.clone() for k, p in params.items()})
        for p in params.values():
            p.grad = None
    for name in params:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-9)
    assert any(g.abs().max() > 0 for g in grads[0].values())


def test_frozen_parameters_get_no_gradient(perturbed):
    pipe, params = perturbed
    sampler = _sampler(pipe)
    result = sampler.rollout(sampler.encode(PROMPTS[:1]), FullChain(), kl=True, generator=torch.Generator().manual_seed(0))
    (-colourfulness(result.images).mean() + result.kl).backward()
    lora_ids = {id(p) for p in params.values()}
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        for name, p in module.named_parameters():
            if id(p) not in lora_ids:
                assert p.grad is None and not p.requires_grad, name
    assert all(p.grad is not None for p in params.values())


def test_kl_is_zero_at_init_and_positive_once_the_lora_moves(sd15):
    pipe, params = sd15
    sampler = _sampler(pipe)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    at_init = sampler.rollout(sampler.encode(PROMPTS[:1]), LastK(k=1), kl=True, generator=gen(), decode=False)
    assert float(at_init.kl.detach()) == 0.0
    with torch.no_grad():
        for name, p in params.items():
            if "lora_B" in name:
                p.fill_(0.01)
    try:
        moved = sampler.rollout(sampler.encode(PROMPTS[:1]), LastK(k=1), kl=True, generator=gen(), decode=False)
        assert float(moved.kl.detach()) > 0 and moved.kl.requires_grad
    finally:
        with torch.no_grad():
            for name, p in params.items():
                if "lora_B" in name:
                    p.zero_()


def test_lora_scale_interpolates_between_base_and_trained(perturbed):
    pipe, _ = perturbed
    sampler = _sampler(pipe)
    cond = sampler.encode(PROMPTS[:1])

    def images():
        with torch.no_grad():
            return sampler.rollout(cond, NoGrad(), generator=torch.Generator().manual_seed(0)).images

    trained = images()
    pipe.unet.disable_adapters()
    base = images()
    pipe.unet.enable_adapters()
    with lora_scale(pipe.unet, 0.0):
        at_zero = images()
    with lora_scale(pipe.unet, 0.5):
        half = images()
    torch.testing.assert_close(at_zero, base)
    assert (trained - base).abs().max() > 1e-4 and (half - base).abs().max() > 0 and (half - trained).abs().max() > 0
    torch.testing.assert_close(images(), trained)  # the scale is restored on exit


def test_saved_lora_loads_in_a_fresh_pipeline_with_identical_output(perturbed, tmp_path):
    pipe, _ = perturbed
    paths = save_reward_lora(pipe, tmp_path, "tiny:sd15", {"method": "reward"})
    assert [p.name for p in paths] == ["pytorch_lora_weights.safetensors", "lora_kohya.safetensors"]
    from dcustom.adapters.files import read_metadata

    assert read_metadata(paths[0])["dcustom.method"] == "reward"
    fresh = load_pipeline("tiny:sd15", device="cpu", dtype="fp32")
    fresh.load_lora_weights(str(tmp_path))
    out = []
    for p in (pipe, fresh):
        sampler = _sampler(p, steps=2)
        with torch.no_grad():
            out.append(sampler.rollout(sampler.encode(PROMPTS[:1]), NoGrad(), generator=torch.Generator().manual_seed(0)).images)
    torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-5)


def test_sdxl_conditioning_and_gradient_pass_through():
    pipe = load_pipeline("tiny:sdxl", device="cpu", dtype="fp32")
    params = add_reward_lora(pipe.unet)
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("added_cond_kwargs")), with_kwargs=True)
    try:
        sampler = _sampler(pipe)
        cond = sampler.encode(PROMPTS)
        report = check_reward_gradient(sampler, build_reward("colourfulness"), PROMPTS, params)
    finally:
        handle.remove()
    assert cond.embeds.shape[:2] == (4, 77) and cond.embeds.shape[-1] == 64
    assert cond.added["text_embeds"].shape == (4, 32)
    assert cond.added["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 4
    assert seen and all(kw is not None and set(kw) == {"text_embeds", "time_ids"} for kw in seen)
    assert len(report.nonzero) == sum("lora_B" in n for n in params)
    # micro-conditioning reaches the UNet: another original size changes the prediction
    from dcustom.trainers.reward.sampler import encode_prompts

    other = encode_prompts(pipe, PROMPTS, guidance_scale=3.0, height=32, width=32, original_size=(64, 64))
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = sampler.model_output(x, 500, cond, grad=False)
        b = sampler.model_output(x, 500, other, grad=False)
    assert (a - b).abs().max() > 0


def test_best_of_n_keeps_the_highest_scoring_sample_per_prompt(sd15):
    from dcustom.trainers.reward.baselines import best_of_n

    pipe, _ = sd15
    sampler = _sampler(pipe)
    reward = build_reward("colourfulness")
    chosen, calls = best_of_n(sampler, reward, PROMPTS, n=3, seed=5)
    assert calls == 6 and chosen.shape == (2, 3, 32, 32)
    with torch.no_grad():
        cond = sampler.encode(PROMPTS)
        each = torch.stack([reward(sampler.rollout(cond, NoGrad(), generator=torch.Generator().manual_seed(5 + j)).images,
                                   PROMPTS) for j in range(3)])
    torch.testing.assert_close(reward(chosen, PROMPTS), each.max(0).values)
