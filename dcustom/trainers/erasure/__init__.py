"""Concept erasure: closed-form UCE and ESD fine-tuning (ESD-x / ESD-u), `dcustom train erasure`.

    from dcustom.trainers.erasure import ErasureTrainConfig, run, load_erasure
    result = run(ErasureTrainConfig(model="builtin:toy", algorithm="uce", erase=["purple"]))
    load_erasure(pipe, result.run_dir)   # a diffusers LoRA: pipe.load_lora_weights works too

Modules: config (torch-free settings), selection (which layers each algorithm edits), conditioning
(family-aware UNet inputs), uce (closed form + its run), esd (target + loop method + its run), artifacts
(files, ErasureResult), run (dispatch by algorithm).
"""

_LAZY = {
    "ErasureTrainConfig": "dcustom.trainers.erasure.config:ErasureTrainConfig",
    "run": "dcustom.trainers.erasure.run:run",
    "ErasureResult": "dcustom.trainers.erasure.artifacts:ErasureResult",
    "load_erasure": "dcustom.trainers.erasure.artifacts:load_erasure",
    "read_metadata": "dcustom.trainers.erasure.artifacts:read_metadata",
    "compute_uce": "dcustom.trainers.erasure.uce:compute_uce",
    "apply_uce": "dcustom.trainers.erasure.uce:apply_uce",
    "esd_target": "dcustom.trainers.erasure.esd:esd_target",
}

from dcustom.lazy import lazy_exports  # noqa: E402

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
