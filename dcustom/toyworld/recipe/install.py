"""Installing a trained toy model into the package as builtin:toy (dcustom/toyworld/weights/toy).

The recipe installs its own result when cfg.install is set (and only if the curve's last point binds
shapes); `install_folder` is also what scripts call to ship a model folder checked by other means.
Whatever installs, a shipped model is never replaced by one that scores lower: each install writes the
figures it was judged by into toy_score.json beside model_index.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dcustom.errors import DcustomError

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "weights" / "toy"  # where builtin:toy is read from
SCORE_FILE = "toy_score.json"  # beside model_index.json: the figures the install decision compared


def install(curve: list[dict], folder: Path, min_shape: float, log=print) -> Path:
    """Copy a trained model folder into the package as builtin:toy, only if it binds shapes."""
    last = curve[-1] if curve else {}
    shape = last.get("shape", 0.0)
    if shape < min_shape:
        raise DcustomError(f"install refused: final J_eval shape accuracy {shape:.2f} is below "
                           f"install_min_shape_accuracy {min_shape:.2f}; the model stays in {folder}.")
    score = {k: last[k] for k in ("prompt", "shape", "colour", "background") if k in last}
    return install_folder(folder, log, score={"source": "learning curve (last point)", **score})


def install_folder(folder: str | Path, log=print, score: dict | None = None, target: Path | None = None) -> Path:
    """Copy a model folder into the package as builtin:toy (atomically: a temp copy, then rename).

    Never replaces a shipped model that scores higher: the prompt accuracy each install recorded (from
    the learning curve, or `score` given by the bars check) is compared first. A folder without a
    recorded score replaces nothing that has one.
    """
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise DcustomError(f"install refused: {str(folder)!r} is not a toy-model folder (no model_index.json).")
    target = target or SHIPPED_DIR
    score = score or read_score(folder)
    shipped = read_score(target)
    if shipped.get("prompt") is not None and (score.get("prompt") is None or score["prompt"] < shipped["prompt"]):
        raise DcustomError(f"install refused: the shipped builtin:toy scores prompt accuracy {shipped['prompt']:.3f} "
                           f"and {str(folder)!r} scores {score.get('prompt', 'nothing recorded')}; the shipped model "
                           f"stays (delete {target} first to replace it anyway).")
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(folder, tmp)
    if score:
        (tmp / SCORE_FILE).write_text(json.dumps(score, indent=1))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    log(f"installed as builtin:toy in {target}")
    return target


def read_score(folder: Path) -> dict:
    try:
        return json.loads((folder / SCORE_FILE).read_text())
    except (OSError, ValueError):
        return {}
