"""The `Reward` type every reward module returns (analytic ones in `rewards`, CLIP in `clip_rewards`, the
toy-world judges in `toy_rewards`); `rewards.build_reward` picks one by name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class Reward:
    """A named reward: `fn(images, prompts) -> [B]`; `differentiable` is False for oracles."""

    name: str
    fn: Callable
    differentiable: bool = True
    modules: tuple = ()  # torch modules it owns (frozen; moved with .to())

    def __call__(self, images, prompts):
        return self.fn(images, prompts)
