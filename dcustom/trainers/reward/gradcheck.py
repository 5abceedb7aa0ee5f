"""Does the reward's gradient actually reach the LoRA? Public reward-backprop code has shipped
`@torch.no_grad()` scorers and VAE helpers that silently train nothing; this check catches them.

`gradient_report(params)` sorts parameters into missing (grad is None), zero and non-zero;
`check_reward_gradient(sampler, reward, prompts, params)` runs one small rollout (last step in the
graph), backpropagates -reward and raises a `DcustomError` naming the problem when the reward does
not depend on the parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dcustom.errors import DcustomError


@dataclass
class GradientReport:
    nonzero: list[str] = field(default_factory=list)
    zero: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    norm: float = 0.0

    @property
    def reaches_all(self) -> bool:
        return not self.zero and not self.missing and bool(self.nonzero)


def gradient_report(params: dict) -> GradientReport:
    import torch

    report = GradientReport()
    total = 0.0
    for name, p in params.items():
        if p.grad is None:
            report.missing.append(name)
        elif torch.count_nonzero(p.grad) == 0:
            report.zero.append(name)
        else:
            report.nonzero.append(name)
            total += float(p.grad.float().pow(2).sum())
    report.norm = total ** 0.5
    return report


def no_gradient_message(reward_name: str) -> str:
    return (f"reward {reward_name!r} gives no gradient to the LoRA weights: the scorer or the VAE decode runs "
            "under torch.no_grad, detaches, or converts to uint8/PIL; rewards must be differentiable torch ops "
            "on the float images.")


def check_reward_gradient(sampler, reward, prompts: list[str], params: dict, require: str = "lora_B",
                          generator=None) -> GradientReport:
    """One rollout with the last UNet call in the graph; raises unless every parameter whose name
    contains `require` gets a non-zero gradient ("lora_B": at the usual B=0 init, A's gradient is
    exactly zero by construction; pass "" to require all)."""
    import torch

    from dcustom.trainers.reward.policies import LastK

    for p in params.values():
        p.grad = None
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    result = sampler.rollout(sampler.encode(prompts), LastK(k=1), generator=generator)
    scores = reward(result.images, prompts)
    if not scores.requires_grad:
        raise DcustomError(no_gradient_message(getattr(reward, "name", "reward")))
    (-scores.float().mean()).backward()
    report = gradient_report(params)
    checked = {n for n in params if require in n}
    bad = [n for n in report.zero + report.missing if n in checked]
    for p in params.values():
        p.grad = None
    if bad or not checked:
        raise DcustomError(no_gradient_message(getattr(reward, "name", "reward"))
                           + f" ({len(bad)} of {len(checked)} parameters got none, e.g. {bad[0] if bad else '-'}).")
    return report
