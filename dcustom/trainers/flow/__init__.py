"""flow_lora: LoRA/DoRA on the MM-DiT transformer of SD3/3.5 and FLUX.1, trained by flow matching.

config.py (FlowLoraTrainConfig, torch-free), objective.py (timestep sampling and shift, the velocity loss, the
transformer call per family), trainer.py (FlowLoraMethod in the shared loop, run)."""
