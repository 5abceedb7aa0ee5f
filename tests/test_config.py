from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from dcustom.config import apply_overrides, from_dict, load_config, opt, save_yaml, to_yaml
from dcustom.errors import DcustomError


@dataclass
class Optim:
    lr: float = opt(1e-4, "Learning rate.")
    betas: tuple[float, float] = opt((0.9, 0.999), "Adam betas.")


@dataclass
class Example:
    method: str = opt("example", "Kind.")
    steps: int = opt(10, "Steps.")
    precision: Literal["fp32", "bf16"] = opt("fp32", "Precision.")
    seed: Optional[int] = opt(None, "Seed.")
    enabled: bool = opt(True, "Switch.")
    layers: list[str] = opt(["a"], "Layers.")
    optimizer: Optim = field(default_factory=Optim, metadata={"help": "Optimizer settings."})


def test_round_trip_and_commented_yaml(tmp_path):
    cfg = Example(steps=3, layers=["x", "y"])
    path = save_yaml(cfg, tmp_path / "c.yaml")
    assert load_config(Example, path) == cfg
    text = to_yaml(Example(), comments=True)
    assert "# Learning rate.\n  lr: 0.0001" in text
    assert from_dict(Example, yaml.safe_load(text)) == Example()


def test_unknown_key_names_allowed_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 2\noptimizer:\n  learning_rate: 0.1\n")
    with pytest.raises(DcustomError) as err:
        load_config(Example, path)
    assert str(err.value) == f"{path}: optimizer: unknown key 'learning_rate'; allowed keys: lr, betas."


def test_overrides_convert_types():
    data = apply_overrides(Example, {}, ["steps=5", "optimizer.lr=3e-4", "enabled=false", "seed=null",
                                         "layers=[p, q]", "precision=bf16", "optimizer.betas=0.8,0.9"])
    cfg = from_dict(Example, data)
    assert cfg.steps == 5 and cfg.optimizer.lr == 3e-4 and cfg.enabled is False and cfg.seed is None
    assert cfg.layers == ["p", "q"] and cfg.precision == "bf16" and cfg.optimizer.betas == (0.8, 0.9)


@pytest.mark.parametrize("override,message", [
    ("steps=ten", "override steps: 'ten' is not valid; expected an integer."),
    ("precision=fp64", "override precision: 'fp64' is not valid; expected one of 'fp32', 'bf16'."),
    ("optimizer.momentum=1", "override 'optimizer.momentum=1': unknown key 'optimizer.momentum'; allowed keys here: betas, lr."),
    ("steps.inner=1", "override 'steps.inner=1': 'steps' is not a section, it takes an integer."),
    ("enabled=maybe", "override enabled: 'maybe' is not valid; expected true/false."),
    ("no_equals_sign", "override 'no_equals_sign' must look like key=value or a.b=value."),
])
def test_bad_override_messages(override, message):
    with pytest.raises(DcustomError) as err:
        load_config(Example, overrides=[override])
    assert str(err.value) == message


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("steps: [1,\n")
    with pytest.raises(DcustomError, match=r"is not valid YAML at line \d"):
        load_config(Example, path)
    with pytest.raises(DcustomError, match="does not exist"):
        load_config(Example, tmp_path / "missing.yaml")
    path.write_text("- a list\n")
    with pytest.raises(DcustomError, match="must hold a mapping of keys to values"):
        load_config(Example, path)


@dataclass
class Tuned:
    """A config whose section default differs from the section class's defaults, and one key that moved."""

    moved_keys = {"optimizer.learning_rate": "optimizer.lr", "old_steps": "steps"}  # a ClassVar: no annotation
    steps: int = opt(10, "Steps.")
    optimizer: Optim = opt(Optim(lr=3e-3, betas=(0.5, 0.5)), "Optimizer settings.")


def test_a_partial_section_starts_from_its_default_in_the_parent():
    cfg = from_dict(Tuned, {"optimizer": {"betas": [0.8, 0.9]}})
    assert cfg.optimizer == Optim(lr=3e-3, betas=(0.8, 0.9))  # lr from Tuned's default, not Optim's 1e-4
    assert load_config(Tuned, overrides=["optimizer.betas=[0.1,0.2]"]).optimizer.lr == 3e-3
    assert from_dict(Tuned, {}).optimizer == Optim(lr=3e-3, betas=(0.5, 0.5))
    assert from_dict(Example, {"optimizer": {"lr": 2.0}}).optimizer == Optim(lr=2.0)  # plain defaults stay


def test_a_moved_key_names_its_new_place(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  learning_rate: 0.1\n")
    with pytest.raises(DcustomError) as err:
        load_config(Tuned, path)
    assert str(err.value) == f"{path}: key 'optimizer.learning_rate' has moved to 'optimizer.lr'; write it there instead."
    with pytest.raises(DcustomError) as err:
        load_config(Tuned, overrides=["old_steps=3"])
    assert str(err.value) == "override 'old_steps=3': key 'old_steps' has moved to 'steps'; write it there instead."
    with pytest.raises(DcustomError, match=r"^config: key 'old_steps' has moved to 'steps'"):
        from_dict(Tuned, {"old_steps": 3})
