"""Trainers that plug into diffusers UNets (LoRA/OFT/BOFT, textual inversion, reward, erasure)."""
