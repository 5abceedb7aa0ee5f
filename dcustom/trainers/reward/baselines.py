"""Best-of-N sampling: the inference-compute baseline a reward fine-tune must beat at an equal
number of reward-model calls (draw N samples per prompt from the current model, keep the one the
training reward scores highest, then report it under the held-out reward)."""

from __future__ import annotations


def best_of_n(sampler, reward, prompts: list[str], n: int, seed: int = 0, negative_prompt: str = ""):
    """(chosen images [P, 3, H, W], reward-model calls spent = n * P); no gradient."""
    import torch

    from dcustom.trainers.reward.policies import NoGrad

    with torch.no_grad():
        cond = sampler.encode(prompts, negative_prompt)
        best_images, best_scores = None, None
        for j in range(n):
            images = sampler.rollout(cond, NoGrad(), generator=torch.Generator().manual_seed(seed + j)).images
            scores = reward(images, prompts).float()
            if best_images is None:
                best_images, best_scores = images.clone(), scores.clone()
            else:
                better = scores > best_scores
                best_images[better] = images[better]
                best_scores = torch.where(better, scores, best_scores)
    return best_images, n * len(prompts)
