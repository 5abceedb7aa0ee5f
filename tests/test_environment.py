"""The locked dependency set: `dcustom env` compares against requirements.lock, the scripts use it, and
a peft too old for the installed transformers fails before training in one sentence."""

from pathlib import Path

import pytest

from dcustom import environment
from dcustom.errors import DcustomError

ROOT = Path(__file__).resolve().parent.parent


def test_lock_pins_every_key_package_exactly_and_torch_without_build_label():
    locked = environment.locked_versions(ROOT / "requirements.lock")
    for dist in environment.KEY_PACKAGES:
        assert dist in locked, f"requirements.lock does not pin {dist}"
    assert "+" not in locked["torch"], "the torch pin must serve any build of its version"
    assert "dcustom" not in locked


def test_installed_set_is_the_locked_set():
    # The suite runs in the environment scripts/setup.sh built from the lock; a drift means the
    # figures in this run are not the ones the lock promises.
    rows = environment.lock_report(ROOT / "requirements.lock")
    assert [r for r in rows if r[3] != "ok"] == []


def test_lock_report_flags_a_version_outside_the_lock(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# header\ntorch==0.0.1\ndiffusers==0.0.1 ; python_version >= '3'\n")
    rows = {r[0]: r for r in environment.lock_report(lock)}
    assert rows["torch"][2:] == ("0.0.1", "OUTSIDE LOCK")
    assert rows["diffusers"][2:] == ("0.0.1", "OUTSIDE LOCK")
    assert rows["peft"][2:] == ("-", "OUTSIDE LOCK")  # a key package the lock does not pin
    assert all(r[3] == "no lock" for r in environment.lock_report(tmp_path / "missing.lock"))


def test_env_prints_the_comparison(cli):
    code, out, _ = cli("env")
    assert code == 0
    assert "against the locked set (requirements.lock):" in out
    for dist in environment.KEY_PACKAGES:
        assert f"  {dist} " in out


def test_peft_too_old_for_transformers_fails_in_one_sentence(monkeypatch):
    from transformers.integrations.peft import MIN_PEFT_VERSION

    environment.check_peft_supports_transformers()  # the locked set is compatible
    real = environment._version
    monkeypatch.setattr(environment, "_version", lambda d: "0.1.0" if d == "peft" else real(d))
    with pytest.raises(DcustomError) as exc:
        environment.check_peft_supports_transformers()
    msg = str(exc.value)
    assert f"peft 0.1.0 is too old for transformers {real('transformers')}" in msg
    assert f"needs peft >= {MIN_PEFT_VERSION}" in msg and "scripts/setup.sh" in msg
    assert msg.count(". ") == 0  # one sentence


def test_text_encoder_lora_checks_peft_before_loading_the_model(monkeypatch, tmp_path):
    from dcustom.config import load_config
    from dcustom.trainers.adapter.config import LoraTrainConfig
    from dcustom.trainers.adapter.trainer import AdapterMethod
    from dcustom.trainers.denoising import DenoisingObjective

    cfg = load_config(LoraTrainConfig, ROOT / "configs" / "lora.yaml",
                      overrides=["model=tiny:sd15", "text_encoder_lora=true"])
    real = environment._version
    monkeypatch.setattr(environment, "_version", lambda d: "0.1.0" if d == "peft" else real(d))
    loaded = []
    monkeypatch.setattr(DenoisingObjective, "load", lambda self, ctx: loaded.append(1))
    with pytest.raises(DcustomError, match="peft 0.1.0 is too old"):
        AdapterMethod(cfg).setup(None)
    assert loaded == []
