"""Trainers that plug into diffusers UNets (LoRA/OFT/BOFT, textual inversion, reward, erasure).

Shared: `loop` (the outer loop and the `TrainingMethod` contract), `run_folder` (run folder, checkpoints,
resume), `denoising` (the subject trainers' objective), `peft_adapters` (LoRA settings, peft configs,
adapter files). One folder per method: adapter/ (lora, oft, boft), textual_inversion/, erasure/, reward/.
"""
