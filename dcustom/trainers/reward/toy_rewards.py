"""Toy-world rewards from the judges: J_train for training, J_eval (same formula) for reporting.

    attribute  r = log p_judge(head = value | image), e.g. head=colour, value=red ("make it red")
    alignment  r = sum over the attributes the prompt names (grammar.parse_caption) of
               log p_judge(head = class | image): the CLIP-score analogue of prompt alignment

The judge's `forward` is differentiable (frozen weights, no `no_grad`); `predict`/`features` are
not, so they are never used on the gradient path.
"""

from __future__ import annotations

from dcustom.errors import DcustomError
from dcustom.trainers.reward.base import Reward


def _judge(kind: str, options: dict, device):
    from dcustom.toyworld.judges import load_judge

    path = options.get("judge_path" if kind == "train" else "eval_judge_path")
    return load_judge(kind, device=str(device), path=path)


def attribute_log_prob(judge, images, head: str, value: str):
    import torch.nn.functional as F

    from dcustom.toyworld.judges import to_tensor

    classes = judge.heads[head]
    logits = judge(to_tensor(images))[head].float()
    return F.log_softmax(logits, dim=-1)[:, classes.index(value)]


def alignment_log_prob(judge, images, prompts):
    import torch
    import torch.nn.functional as F

    from dcustom.toyworld.grammar import parse_caption
    from dcustom.toyworld.judges import to_tensor

    logits = judge(to_tensor(images))
    per_image = []
    for b, prompt in enumerate(prompts):
        terms = [F.log_softmax(logits[h][b].float(), -1)[judge.heads[h].index(c)]
                 for h, c in parse_caption(prompt).items() if h in logits]
        # A prompt naming no judged attribute scores 0 (kept in the graph so shapes stay uniform).
        per_image.append(torch.stack(terms).sum() if terms else logits["shape"][b].float().sum() * 0)
    return torch.stack(per_image)


def toy_reward(kind: str, judge_kind: str, options: dict, device) -> Reward:
    from dcustom.toyworld.grammar import HEADS

    name = f"toy_{kind}_{'j_train' if judge_kind == 'train' else 'j_eval'}"
    head, value = options.get("head", "colour"), options.get("value", "red")
    if kind == "attribute" and (head not in HEADS or value not in HEADS[head]):
        raise DcustomError(f"reward.options: head={head!r}, value={value!r} is not a judge class; accepted heads: "
                           + "; ".join(f"{h}: {', '.join(c)}" for h, c in HEADS.items()) + ".")
    judge = _judge(judge_kind, options, device)
    if kind == "attribute":
        fn = lambda images, prompts: attribute_log_prob(judge, images, head, value)  # noqa: E731
    else:
        fn = lambda images, prompts: alignment_log_prob(judge, images, prompts)  # noqa: E731
    return Reward(name, fn, differentiable=judge_kind == "train", modules=(judge,))


def prompt_accuracy(judge, images, prompts) -> float | None:
    """Share of the attributes named in the prompts that the judge sees in the images (J_eval)."""
    from dcustom.toyworld.grammar import parse_caption

    pred = judge.predict(images)
    hits = total = 0
    for i, prompt in enumerate(prompts):
        for head, cls in parse_caption(prompt).items():
            if head in pred:
                hits += pred[head]["labels"][i] == cls
                total += 1
    return hits / total if total else None
