"""LoRA / DoRA / OFT / BOFT subject training (one trainer, peft configs). Import `train` from `.trainer`."""
