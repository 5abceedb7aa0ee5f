"""Training-free modules that hook stock diffusers pipelines."""
