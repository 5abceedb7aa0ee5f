"""Gradient policies: which UNet calls of a sampling trajectory stay in the autograd graph.

AlignProp, DRaFT, DRaFT-K and DRaFT-LV are one algorithm (backpropagate a differentiable reward
through a DDIM/CFG sampler); they differ only in the set S of denoising steps whose UNet call keeps
gradients. Steps are indexed 0..T-1 in sampling order (0 = the noisiest step, T-1 = the last).

Named policies (``make_policy(name, ...)``):

  draft                 full chain: every step in S (DRaFT).
  draft_k               the last K steps (DRaFT-K; K=1 is the cheap default).
  draft_lv              no step of the chain; afterwards x0 is re-noised to the last timestep n times
                        and each copy takes one grad step; the rewards are averaged (DRaFT-LV).
  alignprop_step        per-step random truncation as in the original AlignProp code and TRL: at
                        each step i a fresh boundary b ~ U{lo..hi} is drawn and step i is in S iff
                        i >= b, so step i is in S with probability (i-lo+1)/(hi-lo+1); S is in
                        general not contiguous (lo=0, hi=T: about half the steps).
  alignprop_trajectory  per-trajectory truncation as in AlignProp v2: one boundary
                        b = round(N(mean*T, std*T)) per trajectory, redrawn until 1 <= b <= T-1, and
                        S = {b..T-1}; mean 0.84, std 0.10 reproduce N(42, 5) at T=50 (K about 8).

Truncation semantics: a step outside S runs its UNet call under no_grad, so it contributes no
parameter gradient; the latent path x_t -> x_{t-1} is NOT cut (as in the public code), so gradient
of a later step still flows back through the linear part of the DDIM update to earlier steps in S.
For contiguous policies this changes nothing; for ``alignprop_step`` it is what the original does.

Randomness comes from torch's global RNG (or a given generator), which the training loop seeds
and checkpoints, so a resumed run draws the same sets.
"""

from __future__ import annotations

from dataclasses import dataclass

from dcustom.errors import DcustomError

POLICY_NAMES = ("draft", "draft_k", "draft_lv", "alignprop_step", "alignprop_trajectory")


@dataclass(frozen=True)
class GradPolicy:
    """Base class: `grad_steps(T)` is the set S for one trajectory; `lv_copies` > 0 only for DRaFT-LV."""

    name: str = "base"
    lv_copies: int = 0

    def grad_steps(self, num_steps: int, generator=None) -> frozenset[int]:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def expected_grad_calls(self, num_steps: int) -> float:
        """Expected number of UNet calls kept in the graph per trajectory (for logs and tests)."""
        raise NotImplementedError


@dataclass(frozen=True)
class NoGrad(GradPolicy):
    """No UNet call in the graph: plain sampling (evaluation, best-of-N)."""

    name: str = "none"

    def grad_steps(self, num_steps, generator=None):
        return frozenset()

    def expected_grad_calls(self, num_steps):
        return 0.0


@dataclass(frozen=True)
class FullChain(GradPolicy):
    name: str = "draft"

    def grad_steps(self, num_steps, generator=None):
        return frozenset(range(num_steps))

    def expected_grad_calls(self, num_steps):
        return float(num_steps)


@dataclass(frozen=True)
class LastK(GradPolicy):
    name: str = "draft_k"
    k: int = 1

    def grad_steps(self, num_steps, generator=None):
        k = min(self.k, num_steps)
        return frozenset(range(num_steps - k, num_steps))

    def describe(self):
        return f"draft_k(k={self.k})"

    def expected_grad_calls(self, num_steps):
        return float(min(self.k, num_steps))


@dataclass(frozen=True)
class LowVariance(GradPolicy):
    name: str = "draft_lv"
    lv_copies: int = 2

    def grad_steps(self, num_steps, generator=None):
        return frozenset()

    def describe(self):
        return f"draft_lv(n={self.lv_copies})"

    def expected_grad_calls(self, num_steps):
        return float(self.lv_copies)


def _randint(lo: int, hi: int, generator) -> int:
    import torch

    return int(torch.randint(lo, hi + 1, (1,), generator=generator).item())


@dataclass(frozen=True)
class PerStepRandom(GradPolicy):
    """AlignProp v1 / TRL: a boundary drawn afresh at every step; hi=None means T."""

    name: str = "alignprop_step"
    lo: int = 0
    hi: int | None = None

    def grad_steps(self, num_steps, generator=None):
        hi = num_steps if self.hi is None else self.hi
        return frozenset(i for i in range(num_steps) if i >= _randint(self.lo, hi, generator))

    def describe(self):
        return f"alignprop_step(lo={self.lo}, hi={'T' if self.hi is None else self.hi})"

    def expected_grad_calls(self, num_steps):
        hi = num_steps if self.hi is None else self.hi
        n = hi - self.lo + 1
        return float(sum(min(max(i - self.lo + 1, 0), n) / n for i in range(num_steps)))


@dataclass(frozen=True)
class PerTrajectoryRandom(GradPolicy):
    """AlignProp v2: one Gaussian boundary per trajectory, as fractions of T."""

    name: str = "alignprop_trajectory"
    mean: float = 0.84
    std: float = 0.10

    def boundary(self, num_steps: int, generator=None) -> int:
        import torch

        if num_steps < 2:
            return 0
        for _ in range(1000):
            b = round(self.mean * num_steps + self.std * num_steps * float(torch.randn((), generator=generator)))
            if 1 <= b <= num_steps - 1:
                return b
        return min(max(round(self.mean * num_steps), 1), num_steps - 1)

    def grad_steps(self, num_steps, generator=None):
        return frozenset(range(self.boundary(num_steps, generator), num_steps))

    def describe(self):
        return f"alignprop_trajectory(mean={self.mean}T, std={self.std}T)"

    def expected_grad_calls(self, num_steps):
        return float(num_steps - round(self.mean * num_steps))


def make_policy(name: str, k: int = 1, lv_copies: int = 2, step_lo: int = 0, step_hi: int | None = None,
                boundary_mean: float = 0.84, boundary_std: float = 0.10) -> GradPolicy:
    """A policy by name (see module doc); options that do not apply to `name` are ignored."""
    if name == "draft":
        return FullChain()
    if name == "draft_k":
        if k < 1:
            raise DcustomError(f"policy.k: {k} is not valid; draft_k needs k >= 1.")
        return LastK(k=k)
    if name == "draft_lv":
        if lv_copies < 1:
            raise DcustomError(f"policy.lv_copies: {lv_copies} is not valid; draft_lv needs at least 1 copy.")
        return LowVariance(lv_copies=lv_copies)
    if name == "alignprop_step":
        return PerStepRandom(lo=step_lo, hi=step_hi)
    if name == "alignprop_trajectory":
        if not 0 < boundary_mean < 1 or boundary_std < 0:
            raise DcustomError(f"policy.boundary_mean/std: ({boundary_mean}, {boundary_std}) is not valid; "
                               "accepted: 0 < mean < 1 and std >= 0 (fractions of the step count).")
        return PerTrajectoryRandom(mean=boundary_mean, std=boundary_std)
    raise DcustomError(f"policy.name: {name!r} is not known; accepted: {', '.join(POLICY_NAMES)}.")
