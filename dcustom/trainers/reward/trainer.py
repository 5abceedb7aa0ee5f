"""`dcustom train reward`: AlignProp / DRaFT on the shared training loop.

Each training step rolls out a batch of trajectories with the differentiable sampler, keeps the
UNet calls the gradient policy selects in the graph, scores the decoded images with the reward and
returns `coeff * (-r)` (or `coeff * |r - target|`) plus the optional KL to the base model; the loop
does backward, clipping and the optimizer step on the UNet LoRA.

Every `train.sample_every` steps (and at step 0 and the end) the method evaluates on fixed prompts
and seeds: the training reward, its held-out counterpart (J_eval or an analytic oracle) and the
diversity across seeds go to `reward_report.json` / `.png`; early stopping watches one of them and
keeps the best LoRA. At the end the LoRA-scale curve (DRaFT's scaling, AlignProp's soup with the
base) is evaluated.
"""

from __future__ import annotations

from pathlib import Path

from dcustom.errors import DcustomError
from dcustom.trainers.loop import TrainingMethod
from dcustom.trainers.reward.config import RewardTrainConfig


def read_prompts(cfg: RewardTrainConfig) -> list[str]:
    if cfg.prompt_file:
        path = Path(cfg.prompt_file)
        if not path.is_file():
            raise DcustomError(f"prompt_file: {str(path)!r} does not exist; give a text file with one prompt per line.")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise DcustomError(f"prompt_file: {str(path)!r} holds no prompts; write one prompt per line.")
        return prompts
    if not cfg.prompts:
        raise DcustomError("prompts: the list is empty; give at least one training prompt (or prompt_file).")
    return list(cfg.prompts)


class RewardMethod(TrainingMethod):
    """The reward fine-tuning method on the shared loop (`dcustom.trainers.loop.run_training`)."""

    def __init__(self, cfg: RewardTrainConfig):
        self.cfg = cfg
        self.history: list[dict] = []
        self.batch_rewards: list[dict] = []
        self.best: float | None = None
        self.best_step = 0
        self.bad_evals = 0
        self.best_state: dict | None = None
        self.early_stopped = False

    # -- loop interface -------------------------------------------------------------------------
    def setup(self, ctx):
        import torch

        from dcustom.models import family_of, load_pipeline
        from dcustom.trainers.reward.gradcheck import check_reward_gradient
        from dcustom.trainers.reward.lora import add_reward_lora
        from dcustom.trainers.reward.policies import make_policy
        from dcustom.trainers.reward.rewards import build_eval_reward, build_reward
        from dcustom.trainers.reward.sampler import RewardSampler

        cfg = self.cfg
        self.ctx = ctx
        prompts = read_prompts(cfg)
        self.pipe = pipe = load_pipeline(cfg.model, dtype=ctx.weight_dtype, device=str(ctx.device))
        for name in family_of(pipe).text_encoders:
            getattr(pipe, name).requires_grad_(False)
        pipe.vae.requires_grad_(False)
        self.params = add_reward_lora(pipe.unet, cfg.lora, cfg.target_modules)
        s = cfg.sampler
        self.sampler = RewardSampler(pipe, s.steps, s.guidance, s.eta, s.height, s.width, s.checkpoint_unet,
                                     s.checkpoint_vae or ctx.cfg.gradient_checkpointing)
        p = cfg.policy
        self.policy = make_policy(p.name, p.k, p.lv_copies, p.step_lo, p.step_hi, p.boundary_mean, p.boundary_std)
        self.reward = build_reward(cfg.reward.name, cfg.reward.options, ctx.device)
        self.eval_reward = build_eval_reward(cfg.reward.name, cfg.reward.options, ctx.device)
        for module in self.reward.modules:
            module.to(ctx.device)
        if cfg.preflight_gradient_check:
            check_reward_gradient(self.sampler, self.reward, prompts[:1], self.params,
                                  generator=torch.Generator().manual_seed(cfg.train.seed))
        self.eval_prompts = list(cfg.eval.prompts) or prompts
        if not cfg.train.resume and ctx.is_main:
            self._record(self.evaluate(), step=0)  # the LoRA starts at B = 0: this is the base model
        return prompts

    def trainable_parameters(self):
        return self.params

    def training_step(self, batch: list, step: int):
        from dcustom.trainers.reward.gradcheck import no_gradient_message

        r_cfg = self.cfg.reward
        cond = self.sampler.encode(batch, self.cfg.sampler.negative_prompt)
        result = self.sampler.rollout(cond, self.policy, kl=r_cfg.kl_weight > 0)
        scores = result.per_sample(self.reward(result.images, list(batch) * result.copies).float())
        if r_cfg.mode == "target":
            loss = r_cfg.coeff * (scores - r_cfg.target).abs().mean()
        else:
            loss = -r_cfg.coeff * scores.mean()
        if result.kl is not None:
            loss = loss + r_cfg.kl_weight * result.kl
        if not loss.requires_grad:
            if result.grad_calls > 0:
                raise DcustomError(no_gradient_message(self.reward.name))
            # A random truncation policy may keep no call at all on a short chain: a zero update.
            loss = loss + sum(p.sum() for p in self.params.values()) * 0.0
        self.batch_rewards.append({"step": step, "reward": float(scores.detach().mean()),
                                   "grad_steps": result.grad_steps, "grad_calls": result.grad_calls,
                                   "kl": None if result.kl is None else float(result.kl.detach())})
        return loss

    def save(self, folder: Path) -> list[Path]:
        from dcustom.trainers.reward.lora import save_reward_lora

        from dcustom.config import to_dict

        return save_reward_lora(self.pipe, folder, self.cfg.model, to_dict(self.cfg))

    def sample(self, step: int, folder: Path) -> list[Path]:
        """Evaluation at `step`: rewards on the fixed evaluation set, a grid, the report, early stopping."""
        record = self.evaluate(grid_path=Path(folder) / "eval_grid.png")
        self._record(record, step)
        return [Path(folder) / "eval_grid.png"]

    def extra_state(self) -> dict:
        return {"history": self.history, "best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals,
                "batch_rewards": self.batch_rewards}

    def load_extra_state(self, state: dict) -> None:
        self.history = list(state.get("history", []))
        self.batch_rewards = list(state.get("batch_rewards", []))
        self.best, self.best_step = state.get("best"), state.get("best_step", 0)
        self.bad_evals = state.get("bad_evals", 0)

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, grid_path: Path | None = None) -> dict:
        """Rewards of the current model on the fixed evaluation prompts and seeds (no gradient)."""
        import torch

        from dcustom.trainers.reward.policies import NoGrad

        e = self.cfg.eval
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            cond = self.sampler.encode(self.eval_prompts, self.cfg.sampler.negative_prompt)
            images = []
            for j in range(e.images_per_prompt):
                gen = torch.Generator().manual_seed(e.seed + j)
                images.append(self.sampler.rollout(cond, NoGrad(), generator=gen).images)
            stacked = torch.stack(images)  # [seeds, prompts, 3, H, W]
            flat = stacked.flatten(0, 1)
            prompts = self.eval_prompts * e.images_per_prompt
            train_scores = self.reward(flat, prompts).float()
            eval_scores = None if self.eval_reward is None else self.eval_reward(flat, prompts).float()
        record = {"reward_train": float(train_scores.mean()), "reward_train_std": float(train_scores.std(unbiased=False)),
                  "reward_eval": None if eval_scores is None else float(eval_scores.mean()),
                  "diversity": _diversity(stacked)}
        if self.cfg.reward.name.startswith("toy_") and self.eval_reward is not None:
            from dcustom.trainers.reward.toy_rewards import prompt_accuracy

            record["prompt_accuracy_eval"] = prompt_accuracy(self.eval_reward.modules[0], flat, prompts)
        if grid_path is not None:
            _save_grid(stacked, grid_path)
        return record

    def _record(self, record: dict, step: int) -> None:
        from dcustom.trainers.reward.report import write_report

        record = {"step": step, **record}
        self.history = [h for h in self.history if h["step"] != step] + [record]
        e = self.cfg.eval
        watched = record["reward_eval"] if e.early_stop_metric == "eval" else record["reward_train"]
        if watched is not None and (self.best is None or watched > self.best + e.min_delta):
            self.best, self.best_step, self.bad_evals = watched, step, 0
            self.best_state = {k: v.detach().float().cpu().clone() for k, v in self.params.items()}
        elif step > 0:
            self.bad_evals += 1
            if e.early_stop_patience and self.bad_evals >= e.early_stop_patience:
                self.early_stopped = True
        write_report(self.ctx.run_dir, self.summary(), self.history)

    def summary(self) -> dict:
        return {"method": "reward", "model": self.cfg.model, "reward": self.reward.name,
                "eval_reward": None if self.eval_reward is None else self.eval_reward.name,
                "policy": self.policy.describe(), "sampler_steps": self.cfg.sampler.steps,
                "expected_grad_calls_per_trajectory": self.policy.expected_grad_calls(self.cfg.sampler.steps),
                "eval_prompts": self.eval_prompts, "images_per_prompt": self.cfg.eval.images_per_prompt,
                "best_step": self.best_step, "early_stopped": self.early_stopped,
                "batch_rewards": self.batch_rewards}

    def restore_best(self) -> None:
        import torch

        if self.best_state is None:
            return
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.best_state[name].to(p.device, p.dtype))

    def best_of_n_baseline(self) -> dict:
        """Best-of-N from the *base* model at the reward-model calls training spent (N per eval prompt)."""
        import torch

        from dcustom.trainers.reward.baselines import best_of_n
        from dcustom.trainers.reward.lora import lora_scale

        # one entry per micro-batch; each scored batch_size images (times the DRaFT-LV copies)
        calls = len(self.batch_rewards) * self.cfg.train.batch_size * max(1, self.policy.lv_copies)
        n = max(1, calls // len(self.eval_prompts))
        with lora_scale(self.pipe.unet, 0.0):
            images, spent = best_of_n(self.sampler, self.reward, self.eval_prompts, n, self.cfg.eval.seed,
                                      self.cfg.sampler.negative_prompt)
        with torch.no_grad():
            out = {"n": n, "reward_calls": spent, "training_reward_calls": calls,
                   "reward_train": float(self.reward(images, self.eval_prompts).float().mean()),
                   "reward_eval": None if self.eval_reward is None
                   else float(self.eval_reward(images, self.eval_prompts).float().mean())}
        return out

    def scale_curve(self) -> list[dict]:
        from dcustom.trainers.reward.lora import lora_scale

        curve = []
        for s in self.cfg.eval.lora_scales:
            with lora_scale(self.pipe.unet, s):
                rec = self.evaluate()
            curve.append({"scale": s, "reward_train": rec["reward_train"], "reward_eval": rec["reward_eval"],
                          "diversity": rec["diversity"]})
        return curve


def _diversity(stacked) -> float | None:
    """Mean pairwise RMS pixel distance between the seeds of each prompt (0 = collapsed)."""
    import torch

    seeds = stacked.shape[0]
    if seeds < 2:
        return None
    x = stacked.flatten(2).float()  # [seeds, prompts, D]
    dists = [((x[i] - x[j]).pow(2).mean(-1)).sqrt() for i in range(seeds) for j in range(i + 1, seeds)]
    return float(torch.stack(dists).mean())


def _save_grid(stacked, path: Path) -> None:
    import numpy as np
    from PIL import Image

    seeds, prompts = stacked.shape[:2]
    arr = (stacked.clamp(0, 1) * 255).round().byte().permute(1, 3, 0, 4, 2).cpu().numpy()  # [P, H, S, W, 3]
    h, w = arr.shape[1], arr.shape[3]
    grid = np.ascontiguousarray(arr.reshape(prompts * h, seeds * w, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    Image.fromarray(grid).save(tmp)
    tmp.replace(path)


def _external_stop(should_stop) -> bool:
    if should_stop is None:
        return False
    return should_stop.is_set() if hasattr(should_stop, "is_set") else bool(should_stop())


def run(cfg: RewardTrainConfig, on_event=None, should_stop=None, progress: bool = True):
    """Train a reward LoRA as `cfg` says; returns the loop's TrainResult (status may be 'early_stopped')."""
    from dcustom.trainers.loop import run_training
    from dcustom.trainers.reward.report import write_report

    read_prompts(cfg)  # a bad prompt file fails before the run folder is created
    method = RewardMethod(cfg)
    result = run_training(method, cfg.train, run_config=cfg, on_event=on_event, progress=progress,
                          should_stop=lambda: method.early_stopped or _external_stop(should_stop))
    if not method.ctx.is_main:
        return result
    if method.early_stopped:
        method.restore_best()
        result.files = [str(p) for p in method.save(result.run_dir)]
        result.status = "early_stopped"
    curve = method.scale_curve() if result.status != "cancelled" else []
    summary = method.summary()
    if cfg.eval.best_of_n and result.status != "cancelled":
        summary["best_of_n"] = method.best_of_n_baseline()
    write_report(result.run_dir, summary, method.history, curve)
    return result
