"""Two-process data parallel through accelerate on CPU (gloo): gradients are synchronised, so both
ranks end with identical adapter weights although each saw different images and noise; only the
main process writes the run folder. Started with `torchrun --nproc_per_node 2` (accelerate's
`launch --cpu` starts one process on CPU; torchrun starts two gloo ranks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from image_helpers import write_noise_images

WORKER = r'''
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
from dcustom.data import DataConfig
from dcustom.trainers.adapter.config import LoraTrainConfig
from dcustom.trainers.adapter.trainer import train
from dcustom.trainers.loop import LoopConfig
torch.set_num_threads(1)
images, out = sys.argv[1], Path(sys.argv[2])
cfg = LoraTrainConfig(model="tiny:sd15", rank=4, validation_prompts=[],
                      data=DataConfig(images=images, instance_prompt="a photo of sks dog", resolution=32),
                      train=LoopConfig(output_dir=str(out / "run"), steps=2, lr=1e-2, device="cpu", checkpoint_every=1))
result = train(cfg, progress=False)
rank = result.method.ctx.rank
assert result.method.ctx.num_processes == 2, result.method.ctx.num_processes
weights = {k: v.detach().contiguous() for k, v in result.method.trainable_parameters().items()}
save_file(weights, str(out / f"rank{rank}.safetensors"))
'''


def test_two_ranks_end_with_identical_adapter_weights(tmp_path):
    from safetensors.torch import load_file

    images = write_noise_images(tmp_path / "imgs", [(32, 32)] * 4, seed=0)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571",
           str(script), str(images), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert r0.keys() == r1.keys() and r0
    for k in r0:
        assert (r0[k] - r1[k]).abs().max() < 1e-6, k
    run = tmp_path / "run"
    steps = [line for line in (run / "events.jsonl").read_text().splitlines() if '"event": "step"' in line]
    assert len(steps) == 2  # one writer: the main process
    assert (run / "pytorch_lora_weights.safetensors").is_file()
    import json

    states = json.loads((run / "checkpoints" / "step-1" / "rng.json").read_text())["ranks"]
    assert len(states) == 2 and states[0]["torch"] != states[1]["torch"]  # each rank's own RNG
