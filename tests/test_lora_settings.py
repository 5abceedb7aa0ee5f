"""One LoRA settings class for every method that trains a LoRA: the schema, the keys that moved into it
(each old key refused in one sentence naming the new one), per-method defaults that survive a partial
`lora:` section, the peft config built from it, and the Train tab's explicit paths. Torch-free except the
peft config check."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from dcustom.config import from_dict, load_config
from dcustom.errors import DcustomError
from dcustom.registry import get_method
from dcustom.trainers.peft_adapters import LoraAdapterConfig

ROOT = Path(__file__).resolve().parent.parent
LORA_METHODS = ("lora", "textual_inversion", "erasure", "reward")


def lora_settings_of(cfg) -> LoraAdapterConfig:
    """The lora method's config is the settings; the others hold them in their `lora` section."""
    return cfg if isinstance(cfg, LoraAdapterConfig) else cfg.lora


@pytest.mark.parametrize("method", LORA_METHODS)
def test_every_method_that_trains_a_lora_uses_the_one_settings_class(method):
    cls = get_method(method).config_class()
    if method == "lora":
        assert issubclass(cls, LoraAdapterConfig)
    else:
        assert typing.get_type_hints(cls)["lora"] is LoraAdapterConfig
    names = {f.name for f in dataclasses.fields(LoraAdapterConfig)}
    assert names == {"rank", "alpha", "dropout", "dora", "init"}
    # No other LoRA-shaped section class is left anywhere in the schema.
    seen, queue = set(), [cls]
    while queue:
        current = queue.pop()
        for f in dataclasses.fields(current):
            tp = typing.get_type_hints(current)[f.name]
            if dataclasses.is_dataclass(tp) and tp not in seen:
                seen.add(tp)
                queue.append(tp)
                assert "rank" not in {g.name for g in dataclasses.fields(tp)} or tp is LoraAdapterConfig, tp


def test_section_classes_end_in_config():
    for method in ("lora", "oft", "boft", "textual_inversion", "erasure", "reward", "style_injection", "generate"):
        queue = [get_method(method).config_class()]
        while queue:
            current = queue.pop()
            assert current.__name__.endswith("Config"), current.__name__
            queue += [tp for tp in typing.get_type_hints(current).values() if dataclasses.is_dataclass(tp)]


@pytest.mark.parametrize("method, old, new, value", [
    ("textual_inversion", "adapter_options.rank", "lora.rank", 4),
    ("textual_inversion", "adapter_options.alpha", "lora.alpha", 2.0),
    ("textual_inversion", "adapter_options.dropout", "lora.dropout", 0.1),
    ("erasure", "esd.lora_rank", "lora.rank", 4),
    ("erasure", "esd.lora_alpha", "lora.alpha", 2.0),
    ("reward", "lora.targets", "target_modules", ["to_q"]),
])
def test_a_moved_key_is_refused_in_one_sentence_naming_its_new_place(method, old, new, value, tmp_path):
    cls = get_method(method).config_class()
    data = yaml.safe_load((ROOT / "configs" / f"{method}.yaml").read_text())
    node, parts = data, old.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(DcustomError) as err:
        load_config(cls, path)
    assert str(err.value) == f"{path}: key {old!r} has moved to {new!r}; write it there instead."
    text = f"{old}={value}"
    with pytest.raises(DcustomError) as err:
        load_config(cls, ROOT / "configs" / f"{method}.yaml", overrides=[text])
    assert str(err.value) == f"override {text!r}: key {old!r} has moved to {new!r}; write it there instead."
    # The new key takes the value.
    cfg = load_config(cls, ROOT / "configs" / f"{method}.yaml", overrides=[f"{new}={value}"])
    holder = cfg
    for part in new.split("."):
        holder = getattr(holder, part)
    assert holder == value


@pytest.mark.parametrize("method, rank, alpha", [("textual_inversion", 8, 8.0), ("erasure", 8, 8.0), ("reward", 4, None)])
def test_a_partial_lora_section_keeps_the_methods_other_defaults(method, rank, alpha):
    cls = get_method(method).config_class()
    assert (cls().lora.rank, cls().lora.alpha) == (rank, alpha)
    cfg = from_dict(cls, {"lora": {"rank": 2}})
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.init) == (2, alpha, "gaussian")
    cfg = load_config(cls, overrides=["lora.rank=2", "train.steps=3"])
    assert (cfg.lora.rank, cfg.lora.alpha) == (2, alpha)
    assert dataclasses.replace(cfg.train, steps=cls().train.steps) == cls().train  # the method's loop defaults stay


def test_dora_is_refused_where_the_files_cannot_carry_it():
    for method in ("erasure", "reward"):
        with pytest.raises(DcustomError, match=r"lora\.dora is not available for .*; set it to false\.$"):
            from_dict(get_method(method).config_class(), {"lora": {"dora": True}})


def test_lora_config_builds_peft_from_the_settings():
    from peft import LoraConfig

    from dcustom.trainers.peft_adapters import ATTN_TARGETS, lora_config

    built = lora_config(LoraAdapterConfig(rank=4, alpha=None, dropout=0.1, dora=True, init="true"), ATTN_TARGETS)
    assert isinstance(built, LoraConfig)
    assert (built.r, built.lora_alpha, built.lora_dropout, built.use_dora, built.init_lora_weights) == (4, 4, 0.1, True, True)
    assert set(built.target_modules) == set(ATTN_TARGETS)
    assert lora_config(LoraAdapterConfig(rank=8, alpha=2.0), ["to_q"]).lora_alpha == 2.0


def app_state(tmp_path):
    from dcustom.app.paths import AppPaths
    from dcustom.app.service import AppState

    return AppState(paths=AppPaths.create(tmp_path / "data"), default_model="tiny:sd15", device="cpu")


@pytest.mark.parametrize("method, path", [("lora", ("rank",)), ("textual_inversion", ("lora", "rank"))])
def test_the_train_tab_puts_the_rank_at_the_methods_explicit_path(method, path, tmp_path):
    from dcustom.app.training import TrainForm, build_config

    state = app_state(tmp_path)
    notes = []
    form = TrainForm(method=method, model="tiny:sd15", trigger="<sks>", rank=3,
                     overrides="adapter=lora" if method == "textual_inversion" else "")
    cfg = build_config(state, form, state.paths.uploads / "x", state.paths.runs / "y", notes)
    value = cfg
    for part in path:
        value = getattr(value, part)
    assert value == 3 and notes == []


@pytest.mark.parametrize("method", ["oft", "boft"])
def test_the_train_tab_says_when_the_rank_is_not_used(method, tmp_path):
    from dcustom.app.training import TrainForm, build_config, preview_yaml

    state = app_state(tmp_path)
    notes = []
    build_config(state, TrainForm(method=method, model="tiny:sd15", rank=3), state.paths.uploads / "x",
                 state.paths.runs / "y", notes)
    assert notes == [f"LoRA rank 3 is not used: {method} trains no LoRA (its size is block_size)."]
    text = preview_yaml(state, TrainForm(method=method, model="tiny:sd15", rank=3))
    assert text.startswith(f"# note: LoRA rank 3 is not used: {method} trains no LoRA")
    assert yaml.safe_load(text)["method"] == method
