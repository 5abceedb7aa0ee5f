"""`dcustom eval subject` (toyworld/subject_eval.py): each method's shipped config is used with only paths and
trigger words changed, textual inversion gets captions naming its new token, and bad requests fail in one
sentence before anything trains. (The measurement itself is issue 16's acceptance run, recorded in
docs/results.md (Subject training); it needs minutes of CPU per method and subject.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from dcustom.errors import DcustomError
from dcustom.toyworld.subject_eval import method_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("method", ["lora", "oft", "boft"])
def test_adapter_methods_keep_the_shipped_settings(method, tmp_path):
    from dcustom.config import load_config
    from dcustom.registry import get_method

    cfg, thing = method_config(method, CONFIGS, tmp_path / "ex", "ladybug", tmp_path / "run")
    shipped = load_config(get_method(method).config_class(), CONFIGS / f"{method}.yaml")
    assert thing == "zwx circle"
    assert cfg.model == "builtin:toy" and cfg.data.images == str(tmp_path / "ex")
    assert cfg.train.output_dir == str(tmp_path / "run") and cfg.fidelity.subject == "ladybug"
    assert (cfg.train.steps, cfg.train.lr, cfg.target_modules) == (shipped.train.steps, shipped.train.lr,
                                                                   shipped.target_modules)


@pytest.mark.parametrize("method", ["textual_inversion", "pivotal"])
def test_textual_inversion_binds_a_new_token(method, tmp_path):
    cfg, thing = method_config(method, CONFIGS, tmp_path / "ex", "pine", tmp_path / "run")
    assert thing == "<pine>" and cfg.tokens == ["<pine>"] and cfg.init_words == ["triangle"]
    assert cfg.prompts == "captions"
    assert cfg.adapter == ("lora" if method == "pivotal" else "none")


def test_pivotal_takes_the_lora_hold_and_fidelity_cadence(tmp_path):
    from dcustom.config import read_yaml

    lora = read_yaml(CONFIGS / "lora.yaml")
    cfg, _ = method_config("pivotal", CONFIGS, tmp_path / "ex", "robot", tmp_path / "run")
    assert cfg.keep_prompts == lora["keep_prompts"] and cfg.train.sample_every == lora["train"]["sample_every"]
    assert cfg.adapter_options.target_modules == lora["target_modules"] and cfg.fidelity.subject == "robot"


def test_examples_name_the_token_in_their_captions(tmp_path):
    from dcustom.toyworld.subjects import write_subject_examples

    folder, phrase = write_subject_examples("robot", tmp_path, n=2, thing="<robot>")
    captions = [p.read_text() for p in sorted(folder.glob("*.txt"))]
    assert phrase == "sks square" and all("<robot>" in c and "sks" not in c for c in captions)


def test_missing_config_and_unknown_method_fail_in_one_sentence(tmp_path):
    from dcustom.toyworld.subject_eval import evaluate_subject_method

    with pytest.raises(DcustomError, match="shipped config of lora is missing"):
        method_config("lora", tmp_path, tmp_path / "ex", "robot", tmp_path / "run")
    with pytest.raises(DcustomError, match="accepted: lora, oft, boft, textual_inversion, pivotal"):
        evaluate_subject_method("dreambooth", "robot", tmp_path)


def test_cli_refuses_unknown_methods_and_subjects(cli, tmp_path):
    code, _, err = cli("eval", "subject", "--methods", "lora,nope", "-o", tmp_path)
    assert code != 0 and "--methods 'lora,nope': accepted are lora, oft, boft" in err
    code, _, err = cli("eval", "subject", "--subjects", "cat", "-o", tmp_path)
    assert code != 0 and "--subjects 'cat': accepted are robot, ladybug, pine" in err
