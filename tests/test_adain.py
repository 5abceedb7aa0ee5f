"""AdaIN: the output carries the style's per-channel statistics; batches never mix."""

import pytest
import torch

from dcustom.errors import DcustomError
from dcustom.pipelines.adain import adain, latent_adain, mean_std, token_adain


def test_latent_adain_matches_style_channel_statistics():
    torch.manual_seed(0)
    content = torch.randn(2, 4, 16, 16) * 0.3 + 0.5
    style = torch.randn(1, 4, 16, 16) * torch.tensor([2.0, 0.5, 1.0, 3.0]).view(1, 4, 1, 1) - 1.0
    out = latent_adain(content, style)
    m_out, s_out = mean_std(out, (-2, -1))
    m_sty, s_sty = mean_std(style, (-2, -1))
    torch.testing.assert_close(m_out, m_sty.expand_as(m_out), atol=1e-5, rtol=0)
    torch.testing.assert_close(s_out, s_sty.expand_as(s_out), atol=1e-5, rtol=1e-5)
    # the content's spatial pattern survives (per-channel affine map: correlation 1)
    for b in range(2):
        for c in range(4):
            corr = torch.corrcoef(torch.stack([out[b, c].flatten(), content[b, c].flatten()]))[0, 1]
            assert corr > 0.9999


def test_adain_is_per_sample_and_blends_with_alpha():
    torch.manual_seed(1)
    x = torch.randn(3, 2, 8, 8)
    y = torch.randn(3, 2, 8, 8) * 4 + 2
    out = latent_adain(x, y)
    for b in range(3):  # each sample takes its own style's statistics, not the batch's
        torch.testing.assert_close(out[b].mean((-2, -1)), y[b].mean((-2, -1)), atol=1e-5, rtol=0)
    half = latent_adain(x, y, alpha=0.5)
    torch.testing.assert_close(half, 0.5 * out + 0.5 * x)
    with pytest.raises(DcustomError, match="matches neither 1 nor the content batch 3"):
        latent_adain(x, y[:2])


def test_token_adain_over_tokens_with_eps_and_fp16():
    torch.manual_seed(2)
    q = torch.randn(2, 64, 8).half()
    ref = (torch.randn(1, 64, 8) * 3 + 1).half()
    out = token_adain(q, ref)
    assert out.dtype == torch.float16
    m, s = mean_std(out, (-2,))
    mr, sr = mean_std(ref, (-2,))
    torch.testing.assert_close(m, mr.expand_as(m), atol=5e-3, rtol=0)
    assert ((s - sr).abs() / sr).max() < 5e-3  # eps 1e-5 and fp16 output: approximately equal


def test_adain_over_any_dims():
    x, y = torch.randn(2, 5, 7), torch.randn(2, 5, 7) * 2
    out = adain(x, y, dims=(-1,))
    torch.testing.assert_close(out.std(-1, unbiased=False), y.std(-1, unbiased=False), atol=1e-5, rtol=1e-5)


def test_mean_only_adain_moves_the_mean_and_keeps_the_contrast():
    torch.manual_seed(1)
    content, style = torch.randn(1, 4, 8, 8) * 0.3, torch.randn(1, 4, 8, 8) * 2.0 + 1.5
    out = latent_adain(content, style, match_std=False)
    torch.testing.assert_close(mean_std(out, (-2, -1))[0], mean_std(style, (-2, -1))[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mean_std(out, (-2, -1))[1], mean_std(content, (-2, -1))[1], atol=1e-5, rtol=1e-5)
