"""Textual inversion and pivotal tuning on tiny SD1.x and SDXL pipelines: only the new rows change (the
rest of every text encoder, the UNet and the VAE stay bit-identical), saved files reproduce the trained
output in a fresh pipeline through diffusers' own loaders and `load_adapter`, frozen phases hold,
resume is exact, and the CLI drives the same code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from image_helpers import write_noise_images
import torch
from safetensors.torch import load_file

from dcustom.adapters.load import load_adapter
from dcustom.data import DataConfig
from dcustom.errors import DcustomError
from dcustom.models import load_pipeline
from dcustom.trainers.loop import LoopConfig, run_training
from dcustom.trainers.peft_adapters import LoraAdapterConfig
from dcustom.trainers.textual_inversion.config import PivotalAdapterConfig, TextualInversionTrainConfig
from dcustom.trainers.textual_inversion.trainer import TextualInversionMethod, train

PROMPT = "a photo of <toy-subject>"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = write_noise_images(tmp_path_factory.mktemp("subject"), [(32, 32), (48, 32)], seed=0)
    return d


def make_cfg(kind, images, out, **kw):
    loop = dict(output_dir=str(out), steps=2, batch_size=2, lr=5e-2, device="cpu", seed=3, checkpoint_every=0)
    loop.update(kw.pop("train", {}))
    return TextualInversionTrainConfig(model=f"tiny:{kind}", data=DataConfig(images=str(images), resolution=32, cache_text=False),
                                       train=LoopConfig(**loop), validation_prompts=[PROMPT], sample_steps=2, **kw)


def render(pipe, prompt=PROMPT):
    pipe.unet.eval()
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, generator=g, output_type="pt", width=32, height=32).images


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class Recording(TextualInversionMethod):
    """The real method, keeping a copy of its trainable values after setup and after every step."""

    def setup(self, ctx):
        items = super().setup(ctx)
        self.history = [self._values()]
        return items

    def after_optimizer_step(self, step):
        super().after_optimizer_step(step)
        self.history.append(self._values())

    def _values(self):
        return {k: v.detach().clone() for k, v in self.trainable_parameters().items()}


def run(cfg, pipe=None):
    method = Recording(cfg, pipe=pipe)
    result = run_training(method, cfg.train, run_config=cfg, progress=False)
    return method, result


@pytest.mark.parametrize("kind,extra", [("sd15", dict(num_vectors=2)),
                                        ("sdxl", dict(tokens=["<toy-subject>", "<toy-bg>"], init_words=["toy", ""]))],
                         ids=["sd15-multivector", "sdxl-two-tokens"])
def test_only_new_rows_learn_and_files_reproduce_output_in_diffusers(kind, extra, images, tmp_path):
    pipe = load_pipeline(f"tiny:{kind}", device="cpu")
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if kind == "sdxl" else [])
    te_before = [snapshot(te) for te in encoders]
    vocab = [len(pipe.tokenizer)] + ([len(pipe.tokenizer_2)] if kind == "sdxl" else [])
    unet_before, vae_before = snapshot(pipe.unet), snapshot(pipe.vae)
    method, result = run(make_cfg(kind, images, tmp_path / "run", **extra), pipe)
    assert result.status == "finished" and result.step == 2

    # Only the new rows moved; every other weight of each text encoder, the UNet and the VAE is bit-identical.
    for te, before, n in zip(encoders, te_before, vocab):
        after = te.state_dict()
        assert after.keys() == before.keys()
        for key, value in after.items():
            if key.endswith("token_embedding.weight"):
                assert torch.equal(value[:n], before[key]), key
                assert value.shape[0] > n
            else:
                assert torch.equal(value, before[key]), key
    assert all(torch.equal(v, unet_before[k]) for k, v in pipe.unet.state_dict().items())
    assert all(torch.equal(v, vae_before[k]) for k, v in pipe.vae.state_dict().items())
    for name in method.history[0]:
        assert not torch.equal(method.history[0][name], method.history[-1][name]), name
    # The embedding matrix holds the trained rows (the plain pipeline samples with them).
    for slot in method.slots:
        assert torch.equal(slot.text_encoder.get_input_embeddings().weight[slot.ids], method.rows(slot))

    trained = render(pipe)
    run_dir = tmp_path / "run"
    tokens = extra.get("tokens", ["<toy-subject>"])
    embed_files = sorted(run_dir.glob("learned_embeds*.safetensors"))
    assert len(embed_files) == len(tokens) and len(list((run_dir / "a1111").glob("*.safetensors"))) == len(tokens)

    # diffusers' own loader, in a fresh pipeline.
    theirs = load_pipeline(f"tiny:{kind}", device="cpu")
    for f in embed_files:
        state = load_file(str(f))
        if kind == "sdxl":
            token = _meta(f)["dcustom.token"]
            theirs.load_textual_inversion(state["clip_l"], token=token, text_encoder=theirs.text_encoder, tokenizer=theirs.tokenizer)
            theirs.load_textual_inversion(state["clip_g"], token=token, text_encoder=theirs.text_encoder_2, tokenizer=theirs.tokenizer_2)
        else:
            theirs.load_textual_inversion(str(f))
            assert list(state) == tokens and state[tokens[0]].shape == (2, 32)  # {token: [n, dim]}
    assert (render(theirs) - trained).abs().max().item() < 1e-6
    if kind == "sd15":  # a multi-vector token expands to tok tok_1 in diffusers
        assert theirs.maybe_convert_prompt(PROMPT, theirs.tokenizer) == "a photo of <toy-subject> <toy-subject>_1"
    # dcustom's loader on the run folder.
    ours = load_pipeline(f"tiny:{kind}", device="cpu")
    assert sorted(load_adapter(ours, run_dir).split(",")) == sorted(tokens)
    assert (render(ours) - trained).abs().max().item() < 1e-6
    assert (render(ours) - render(load_pipeline(f"tiny:{kind}", device="cpu"))).abs().max().item() > 1e-4
    assert list((run_dir / "samples").rglob("*.png")) and (run_dir / "config.yaml").is_file()


def _meta(path):
    from dcustom.adapters.files import read_metadata

    return read_metadata(path)


def test_pivotal_lora_trains_vectors_first_then_saves_both_files_that_load_together(images, tmp_path):
    cfg = make_cfg("sd15", images, tmp_path / "run", adapter="lora", embedding_fraction=0.5, embedding_lr=5e-2,
                   train={"lr": 1e-2}, lora=LoraAdapterConfig(rank=4, alpha=2.0))
    method, result = run(cfg)
    h = method.history
    vec = "embeddings.text_encoder"
    lora = [k for k in h[0] if k.startswith("unet.")]
    assert lora and method.scale == 5.0
    assert not torch.equal(h[0][vec], h[1][vec]) and torch.equal(h[1][vec], h[2][vec])  # vectors: step 1 only
    assert any(not torch.equal(h[1][k], h[2][k]) for k in lora)  # the LoRA trains throughout
    names = {Path(f).name for f in result.files}
    assert {"learned_embeds.safetensors", "toy-subject.safetensors", "pytorch_lora_weights.safetensors",
            "lora_kohya.safetensors"} <= names
    assert _meta(tmp_path / "run" / "learned_embeds.safetensors")["dcustom.method"] == "textual_inversion+lora"
    trained = render(method.pipe)

    ours = load_pipeline("tiny:sd15", device="cpu")
    assert load_adapter(ours, tmp_path / "run") == "adapter_0"  # both files from the run folder
    assert "<toy-subject>" in ours.tokenizer.get_vocab()
    assert (render(ours) - trained).abs().max().item() < 1e-5
    theirs = load_pipeline("tiny:sd15", device="cpu")  # plain diffusers: two calls
    theirs.load_lora_weights(str(tmp_path / "run"), weight_name="pytorch_lora_weights.safetensors")
    theirs.load_textual_inversion(str(tmp_path / "run"))
    assert (render(theirs) - trained).abs().max().item() < 1e-5


def test_pivotal_holds_prompts_without_the_token_and_keeps_the_best_step_by_the_toy_judge(images, tmp_path):
    from dcustom.trainers.fidelity import FidelityConfig

    kept = ["", "a red circle"]
    cfg = make_cfg("sd15", images, tmp_path / "run", adapter="lora", embedding_lr=5e-2, keep_prompts=kept,
                   keep_weight=2.0, train={"lr": 1e-2, "steps": 3, "sample_every": 1},
                   lora=LoraAdapterConfig(rank=4, alpha=2.0),
                   fidelity=FidelityConfig(judge="toy", subject="robot", steps=2, seeds=1))
    method, result = run(cfg)
    assert method.objective.keep_prompts == kept and method.objective.keep_weight == 2.0
    assert method.judge.prompts == [f"a <toy-subject> on a {bg} background" for bg in ("black", "dotted", "checkered")]
    events = [json.loads(line) for line in (result.run_dir / "events.jsonl").read_text().splitlines()]
    vals = [e for e in events if e["event"] == "validation"]
    assert [v["step"] for v in vals] == [1, 2, 3] and all(v["subject"] == "robot" for v in vals)
    best = json.loads((result.run_dir / "best" / "best.json").read_text())
    assert best["step"] == max(vals, key=lambda v: (v["select"], -v["step"]))["step"]
    names = {p.name for p in (result.run_dir / "best").iterdir()}
    assert {"learned_embeds.safetensors", "pytorch_lora_weights.safetensors", "lora_kohya.safetensors"} <= names
    ours = load_pipeline("tiny:sd15", device="cpu")  # best/ loads like the run folder: the new word and the LoRA
    load_adapter(ours, result.run_dir / "best")
    assert "<toy-subject>" in ours.tokenizer.get_vocab()


def test_textual_inversion_alone_skips_the_hold(images, tmp_path):
    method = TextualInversionMethod(make_cfg("sd15", images, tmp_path / "run", keep_prompts=["a red circle"]))
    assert method.objective.keep_prompts == []  # the vectors never reach a prompt without the token


def test_pivotal_oft_sdxl_adapter_waits_for_its_start_step(images, tmp_path):
    cfg = make_cfg("sdxl", images, tmp_path / "run", adapter="oft",
                   adapter_options=PivotalAdapterConfig(block_size=8, start_step=1))
    method, result = run(cfg)
    h = method.history
    oft = [k for k in h[0] if k.startswith("unet.")]
    assert oft and all(torch.equal(h[0][k], h[1][k]) for k in oft)  # held during step 1
    assert any(not torch.equal(h[1][k], h[2][k]) for k in oft)  # trains from step 2
    for name in ("embeddings.text_encoder", "embeddings.text_encoder_2"):
        assert not torch.equal(h[0][name], h[1][name]) and not torch.equal(h[1][name], h[2][name])
    assert (tmp_path / "run" / "unet" / "adapter_config.json").is_file()
    ours = load_pipeline("tiny:sdxl", device="cpu")
    load_adapter(ours, tmp_path / "run")
    assert (render(ours) - render(method.pipe)).abs().max().item() < 1e-5


def test_resume_is_exact(images, tmp_path):
    kw = dict(adapter="lora", embedding_fraction=0.5, num_vectors=2, lora=LoraAdapterConfig(rank=2, alpha=8.0),
              prompts="templates")
    full = train(make_cfg("sd15", images, tmp_path / "a", train={"steps": 4}, **kw), progress=False)
    seen = []
    stop = lambda: sum(e["event"] == "step" for e in seen) >= 2  # noqa: E731
    first = train(make_cfg("sd15", images, tmp_path / "b", train={"steps": 4}, **kw), on_event=seen.append,
                  should_stop=stop, progress=False)
    assert first.status == "cancelled" and first.step == 2
    second = train(make_cfg("sd15", images, tmp_path / "b", train={"steps": 4, "resume": "latest"}, **kw), progress=False)
    a, b = full.method.trainable_parameters(), second.method.trainable_parameters()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ea, eb = (load_file(str(tmp_path / d / "learned_embeds.safetensors")) for d in ("a", "b"))
    assert torch.equal(ea["<toy-subject>"], eb["<toy-subject>"])


def test_bad_settings_get_clear_messages(images, tmp_path):
    with pytest.raises(DcustomError, match=r"tokens: 'dog' already exists in the tokenizer as a word of its vocabulary; "
                                           r"pick a new word such as '<my-subject>'"):
        train(make_cfg("sd15", images, tmp_path / "a", tokens=["dog"]), progress=False)
    with pytest.raises(DcustomError, match=r"data: no caption contains a placeholder token \(<toy-subject>\), e.g. 'a photo of sks dog'; "
                                           r"put the token in data.instance_prompt"):
        cfg = make_cfg("sd15", images, tmp_path / "b", prompts="captions")
        cfg.data.instance_prompt = "a photo of sks dog"
        train(cfg, progress=False)
    from dcustom.config import from_dict

    with pytest.raises(DcustomError, match=r"config: embedding_fraction 0 with adapter none trains nothing"):
        from_dict(TextualInversionTrainConfig, {"embedding_fraction": 0.0})
    with pytest.raises(DcustomError, match=r"config: tokens: 'two words' is not a usable token"):
        from_dict(TextualInversionTrainConfig, {"tokens": ["two words"]})
    with pytest.raises(DcustomError, match=r"config: tokens: '<Toy>' has capital letters, which CLIP tokenizers lower-case"):
        from_dict(TextualInversionTrainConfig, {"tokens": ["<Toy>"]})


def test_cli_trains_textual_inversion_from_the_shipped_config(cli, images, tmp_path):
    root = Path(__file__).resolve().parent.parent
    code, out, err = cli("train", "textual_inversion", "--config", root / "configs" / "textual_inversion.yaml",
                         "--set", "model=tiny:sd15", "--set", f"data.images={images}", "--set", "data.resolution=32",
                         "--set", f"train.output_dir={tmp_path / 'run'}", "--set", "train.steps=2",
                         "--set", "train.device=cpu", "--set", "sample_steps=1", "--set", "num_vectors=2")
    assert code == 0, err
    assert f"finished at step 2: {tmp_path / 'run'}" in out
    state = load_file(str(tmp_path / "run" / "learned_embeds.safetensors"))
    assert list(state) == ["<toy-subject>"] and state["<toy-subject>"].shape == (2, 32)
    events = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("step") == 2 and events[-1]["event"] == "end"
