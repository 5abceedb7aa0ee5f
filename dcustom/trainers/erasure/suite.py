"""The erasure protocol of the results page, transposed to the toy world: erase one concept (or several at
once) from builtin:toy with UCE, ESD-x and ESD-u, time each on this CPU and judge each with J_eval.

The papers erase a concept named in natural prompts (UCE: "the concept, in a few prompt templates";
ESD: the concept's own prompt). The toy world's prompts always name a colour *with* a shape (and a
shape with a colour), so the templates here are the grammar's own phrasings: an erasure taught only on
"a purple" never meets the embedding of "a purple circle on a striped background" that users type
(measured: UCE on purple with the generic templates leaves it in 12.5 % of images; with these, 0 %).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from dcustom.toyworld.grammar import BACKGROUNDS, COLOURS, SHAPES

# ESD on the toy model: 20 DDIM steps of partial sampling (the model samples with 20) keep a step under
# a second on one CPU thread; η = 1 as in the paper, a rank-8 LoRA on the selected layers. Measured on purple
# (docs/results.md, 2 seeds): with the target's reference the prompt without the colour, ESD-x leaves purple in
# 25 % of images at lr 1e-3 x 200 steps, 12.5 % at 600 steps (also with η = 3), 6 % at lr 3e-3 x 600 steps,
# unrelated prompts kept throughout; hence lr 3e-3 x 1000 steps.
ESD_SETTINGS = {"esd": {"ddim_steps": 20, "negative_guidance": 1.0, "train_mode": "lora"},
                "lora": {"rank": 8, "alpha": 8.0}, "train": {"steps": 1000, "lr": 3e-3, "checkpoint_every": 0}}


def toy_templates(head: str) -> list[str]:
    """Grammar phrasings with '{}' where a word of `head` goes (each shape/colour/background once)."""
    if head == "colour":
        return ([f"a {{}} {s}" for s in SHAPES] + [f"a {{}} {s} on a {b} background" for s, b in zip(SHAPES, BACKGROUNDS)]
                + [f"{{}} {s}, {b} background" for s, b in zip(SHAPES[::-1], BACKGROUNDS)])
    if head == "shape":
        return ([f"a {c} {{}}" for c in COLOURS] + [f"a {c} {{}} on a {b} background" for c, b in zip(COLOURS, BACKGROUNDS)]
                + [f"a {{}} that is {c}, on a {b} background" for c, b in zip(COLOURS[::-1], BACKGROUNDS)])
    return ([f"a {c} {s} on a {{}} background" for c, s in zip(COLOURS, SHAPES)]
            + [f"a {{}} background with a {c} {s}" for c, s in zip(COLOURS[::-1], SHAPES)])


def method_config(algorithm: str, concepts: list[str], output_dir: str, model: str = "builtin:toy",
                  overrides: dict | None = None):
    """The ErasureTrainConfig of one method of the protocol: grammar templates, the head's other classes kept."""
    from dcustom.config import from_dict
    from dcustom.trainers.erasure.config import ErasureTrainConfig
    from dcustom.trainers.erasure.evaluate import HEAD_CLASSES, concept_head

    heads = {concept_head(c)[0] for c in concepts}
    if len(heads) != 1:
        raise ValueError(f"concepts {concepts} name different attributes ({sorted(heads)}); erase several at once "
                         "only within one attribute (their templates are shared)")
    head = heads.pop()
    classes = [concept_head(c)[1] for c in concepts]
    data = {"model": model, "algorithm": algorithm, "erase": classes, "anchors": [""], "templates": toy_templates(head),
            "preserve": [c for c in HEAD_CLASSES[head] if c not in classes]}
    if algorithm != "uce":
        data.update({k: dict(v) for k, v in ESD_SETTINGS.items()})
    for section, values in (overrides or {}).items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    data.setdefault("train", {})["output_dir"] = output_dir
    return from_dict(ErasureTrainConfig, data)


def run_suite(concepts: list[str], algorithms=("uce", "esd_x", "esd_u"), *, model: str = "builtin:toy",
              seeds=(0, 1, 2, 3), steps: int = 20, guidance: float = 5.0, per_group: int = 8, preservation: int = 16,
              attack_prompts: int = 2, attack_steps: int = 50, out_dir="runs/eval_erasure_methods",
              overrides: dict | None = None, on_stage=None) -> dict:
    """Erase `concepts` (together) with each algorithm and judge each concept; writes methods.json."""
    import torch

    from dcustom.models import load_pipeline
    from dcustom.trainers.erasure.evaluate import concept_head, evaluate_erasure
    from dcustom.trainers.erasure.run import run

    say = on_stage or (lambda _msg: None)
    out = Path(out_dir)
    classes = [concept_head(c)[1] for c in concepts]
    base = load_pipeline(model)
    cache: dict = {}
    table = {"concepts": classes, "model": model, "seeds": list(seeds), "steps": steps, "guidance": guidance,
             "threads": torch.get_num_threads(), "methods": {}}
    for algorithm in algorithms:
        say(f"{algorithm}: erasing {', '.join(classes)}")
        cfg = method_config(algorithm, classes, str(out / algorithm / "run"), model, overrides)
        torch.manual_seed(cfg.train.seed)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        result = run(cfg, progress=False)
        row = {"cpu_seconds": round(time.process_time() - cpu0, 2), "wall_seconds": round(time.perf_counter() - wall0, 2),
               "info": result.info, "concepts": {}}
        for cls in classes:
            say(f"{algorithm}: judging {cls}")
            co_erased = [c for c in classes if c != cls]
            report = evaluate_erasure(base, result.pipe, cls, seeds=seeds, steps=steps, guidance=guidance,
                                      per_group=per_group, preservation=preservation, exclude=co_erased,
                                      attack_prompts=attack_prompts, attack_steps=attack_steps,
                                      out_dir=out / algorithm / cls, base_cache=cache, on_stage=on_stage)
            row["concepts"][cls] = report["summary"]
        table["methods"][algorithm] = row
        del result
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".methods.json.tmp"
    tmp.write_text(json.dumps(table, indent=2, default=str))
    tmp.replace(out / "methods.json")
    table["file"] = str(out / "methods.json")
    return table


def format_table(table: dict) -> str:
    """One line per (method, concept): the issue's four figures, the attack and the time."""
    lines = [f"{'method':7s} {'concept':8s} {'own':>6s} {'syn.':>6s} {'others':>7s} {'neighb.':>8s} "
             f"{'prompt acc.':>12s} {'attack pre→post':>16s} {'CPU s':>7s}  bars"]
    for algorithm, row in table["methods"].items():
        for cls, s in row["concepts"].items():
            r = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
            pres = s["preservation_prompt_accuracy"]
            attack = f"{r(s.get('attack_pre_rate'))}→{r(s['attack_success_rate'])}"
            held = "all" if all(s["acceptance"].values()) else "missed: " + ", ".join(
                k for k, ok in s["acceptance"].items() if not ok)
            lines.append(f"{algorithm:7s} {cls:8s} {r(s['efficacy']['erased']):>6s} {r(s['generality']['erased']):>6s} "
                         f"{r(s['others']['ratio']):>7s} {r(s['neighbours']['ratio']):>8s} "
                         f"{r(pres['base'])}→{r(pres['erased']):>6s} {attack:>16s} {row['cpu_seconds']:>7.1f}  {held}")
    return "\n".join(lines)
