"""The reward registry: analytic rewards and oracles, CLIP-based scorers from local weights, toy
judges' rewards; each training reward must pass gradient to the images."""

from __future__ import annotations

import pytest
import torch

from dcustom.errors import DcustomError
from dcustom.trainers.reward.rewards import (REWARDS, build_eval_reward, build_reward, colourfulness,
                                             colourfulness_oracle, compressibility_proxy, jpeg_kilobytes)


def _images(seed=0, n=2, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _grad_reaches_images(reward, images, prompts):
    x = images.clone().requires_grad_(True)
    out = reward(x, prompts)
    assert out.shape == (len(images),)
    out.sum().backward()
    return x.grad is not None and x.grad.abs().sum() > 0


def test_colourfulness_matches_the_formula_and_its_oracle():
    grey = torch.full((1, 3, 8, 8), 0.5)
    assert float(colourfulness(grey)) < 0.01
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1.0
    # pure red: rg = 255, yb = 127.5, no spread -> M = 0.3 * sqrt(255^2 + 127.5^2)
    assert float(colourfulness(red)) == pytest.approx(0.3 * (255**2 + 127.5**2) ** 0.5, rel=1e-4)
    x = _images()
    r = x[:, 0] * 255
    g, b = x[:, 1] * 255, x[:, 2] * 255
    rg, yb = (r - g).flatten(1), (0.5 * (r + g) - b).flatten(1)
    expected = (rg.var(1, unbiased=False) + yb.var(1, unbiased=False)).sqrt() + 0.3 * (rg.mean(1) ** 2 + yb.mean(1) ** 2).sqrt()
    torch.testing.assert_close(colourfulness(x), expected, rtol=1e-4, atol=1e-3)
    assert (colourfulness_oracle(x) - colourfulness(x)).abs().max() < 1.0  # quantisation only
    assert _grad_reaches_images(build_reward("colourfulness"), x, ["p", "q"])
    assert not build_eval_reward("colourfulness").differentiable


def test_compressibility_proxy_ranks_like_real_jpeg_size():
    flat = torch.full((1, 3, 32, 32), 0.4)
    noisy = _images(n=1)
    assert float(compressibility_proxy(flat)) > float(compressibility_proxy(noisy))
    assert float(jpeg_kilobytes(flat)) < float(jpeg_kilobytes(noisy))
    oracle = build_eval_reward("compressibility")
    assert float(oracle(flat, [""])) > float(oracle(noisy, [""]))
    assert _grad_reaches_images(build_reward("compressibility"), noisy, [""])


def _tiny_vision(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              image_size=32, patch_size=8, projection_dim=16)
    folder = tmp_path / "clip_vision"
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    return folder


def test_aesthetic_predictor_from_local_weights_is_differentiable(tmp_path):
    from safetensors.torch import save_file

    from dcustom.trainers.reward.clip_rewards import aesthetic_head

    folder = _tiny_vision(tmp_path)
    head = aesthetic_head(16)
    # LAION's head file names its modules layers.N; both spellings load.
    save_file({f"layers.{k}": v.contiguous() for k, v in head.state_dict().items()}, str(tmp_path / "head.safetensors"))
    reward = build_reward("aesthetic", {"clip_path": str(folder), "head_path": str(tmp_path / "head.safetensors")})
    x = _images(size=64)
    with torch.no_grad():
        expected_emb = reward.modules[0](pixel_values=torch.nn.functional.interpolate(
            x, size=(32, 32), mode="bilinear", antialias=True)).image_embeds
    assert _grad_reaches_images(reward, x, ["a", "b"])
    assert float(reward(x, ["a", "b"]).std()) > 0 and expected_emb.shape == (2, 16)
    assert build_eval_reward("aesthetic", {"clip_path": str(folder), "head_path": "x"}) is None
    save_file({"0.weight": torch.zeros(3, 3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(DcustomError, match="does not fit the aesthetic MLP layout"):
        build_reward("aesthetic", {"clip_path": str(folder), "head_path": str(tmp_path / "bad.safetensors")})
    with pytest.raises(DcustomError, match="needs clip_path"):
        build_reward("aesthetic", {})


def test_clip_score_from_a_local_clip_model(tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from dcustom.tiny import TINY_WORDS
    from dcustom.tokenizer_vocab import build_clip_tokenizer

    folder = tmp_path / "clip"
    tokenizer = build_clip_tokenizer(TINY_WORDS, str(folder), model_max_length=16)
    vocab = len(tokenizer)
    text = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                          vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
                          max_position_embeddings=16)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    reward = build_reward("clip_score", {"clip_path": str(folder)})
    x = _images(size=64)
    assert _grad_reaches_images(reward, x, ["a red circle", "a blue square"])
    scores = reward(x, ["a red circle", "a blue square"])
    assert scores.abs().max() <= 100.0 + 1e-3
    swapped = reward(x, ["a blue square", "a red circle"])
    assert (scores - swapped).abs().max() > 0  # the text matters


def test_toy_rewards_read_the_judge_heads_differentiably():
    from dcustom.toyworld.judges import Judge
    from dcustom.trainers.reward.toy_rewards import alignment_log_prob, attribute_log_prob

    torch.manual_seed(0)
    judge = Judge("bn_relu_cnn", "train").eval().requires_grad_(False)
    x = _images(size=64)
    red = attribute_log_prob(judge, x, "colour", "red")
    logits = judge(x)
    torch.testing.assert_close(red, logits["colour"].log_softmax(-1)[:, 0])
    prompts = ["a red circle on a striped background", "a photo"]
    aligned = alignment_log_prob(judge, x, prompts)
    lp = {h: v.log_softmax(-1) for h, v in logits.items()}
    want0 = lp["colour"][0, 0] + lp["shape"][0, 0] + lp["background"][0, 3]
    torch.testing.assert_close(aligned, torch.stack([want0, torch.tensor(0.0)]))
    assert _grad_reaches_images(lambda i, p: attribute_log_prob(judge, i, "colour", "red"), x, prompts)


def test_unknown_reward_and_bad_toy_options_are_clear_errors():
    with pytest.raises(DcustomError, match="reward.name: 'beauty' is not known; accepted: colourfulness"):
        build_reward("beauty")
    assert set(REWARDS) == {"colourfulness", "compressibility", "aesthetic", "clip_score", "toy_attribute", "toy_alignment"}
    with pytest.raises(DcustomError, match="head='colour', value='pink' is not a judge class"):
        build_reward("toy_attribute", {"head": "colour", "value": "pink"})


def test_shipped_judges_give_a_differentiable_train_reward_and_an_eval_counterpart():
    from dcustom.toyworld.judges import weights_path

    if not (weights_path("train").is_file() and weights_path("eval").is_file()):
        pytest.skip("the toy-world judges' weights are not shipped in this install")
    x = _images(size=64)
    for name in ("toy_attribute", "toy_alignment"):
        train = build_reward(name, {"head": "colour", "value": "red"})
        held_out = build_eval_reward(name, {"head": "colour", "value": "red"})
        assert train.name.endswith("j_train") and held_out.name.endswith("j_eval") and not held_out.differentiable
        assert train.modules[0] is not held_out.modules[0]
        assert _grad_reaches_images(train, x, ["a red circle", "a blue square on a dotted background"])
