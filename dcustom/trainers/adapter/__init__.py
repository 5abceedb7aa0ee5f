"""LoRA / DoRA / OFT / BOFT subject training: one trainer, peft configs injected with `unet.add_adapter`.

    from dcustom.trainers.adapter import LoraTrainConfig, train
    result = train(LoraTrainConfig(model="builtin:toy", data=DataConfig(images="my_dog/")))
    result.files  # pytorch_lora_weights.safetensors, lora_kohya.safetensors

Torch-free at import (torch loads inside the functions).
"""

from dcustom.trainers.adapter.config import BoftTrainConfig, LoraTrainConfig, OftTrainConfig  # noqa: F401
from dcustom.trainers.adapter.trainer import AdapterMethod, train  # noqa: F401
