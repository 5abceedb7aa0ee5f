"""Textual inversion and pivotal tuning (new token vectors, optionally with a LoRA/OFT adapter).

Config in `.config` (torch-free); the trainer (`train`, `run`) in `.trainer`.
"""
