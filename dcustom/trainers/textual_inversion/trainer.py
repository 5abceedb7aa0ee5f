"""Textual inversion (new token vectors) and pivotal tuning (the vectors plus a LoRA/OFT adapter).

Runs inside `dcustom.trainers.loop` as a `TrainingMethod`. It holds the same `DenoisingObjective` as
the adapter trainer (cached latents, buckets, flips, ε/v targets, min-SNR-γ, SDXL conditioning,
validation samples) and builds the pivotal-tuning adapter with the same `peft_adapters` functions
(`lora_config` from the `lora:` settings, `oft_config`, `save_adapter_files`); only the text side differs.

How only the new rows learn: the tokens are added to each tokenizer and the embedding matrix grows
by their rows, but the matrix itself stays frozen. The trainable parameter is a small
[new rows, dim] tensor per text encoder; a forward hook on the token-embedding module splices
`anchor + scale * delta` into the looked-up embeddings during `training_step`, so gradients reach
only these rows. After every optimizer step the rows are written into the matrix (so the pipeline
samples and saves with its ordinary modules) and parameters that are in a frozen phase (the vectors
after `embedding_fraction`, the adapter before its start step) are restored to their snapshot; the
rest of the text encoder is never a parameter, so it stays bit-identical. `scale` is
embedding_lr / train.lr, which gives the vectors their own learning rate under the loop's single
AdamW (Adam's step is scale-free, so the rows move by about embedding_lr per step).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from dcustom.config import to_dict
from dcustom.errors import DcustomError
from dcustom.trainers.denoising import DenoisingObjective, SubjectMethod
from dcustom.trainers.fidelity import FidelityTracking
from dcustom.trainers.loop import LoopContext, run_training
from dcustom.trainers.peft_adapters import check_targets, lora_config, oft_config, peft_version, save_adapter_files
from dcustom.trainers.textual_inversion.config import TextualInversionTrainConfig

log = logging.getLogger("dcustom.train")

# Our own short template sets: the token stands for the subject ("object") or for the look ("style").
OBJECT_TEMPLATES = (
    "a photo of a {}", "a picture of a {}", "a photo of the {}", "a close-up photo of a {}", "a bright photo of a {}",
    "a dark photo of the {}", "a small {}", "a large {}", "a cropped photo of the {}", "a good photo of a {}",
    "a rendering of a {}", "a photo of one {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a picture in the style of {}", "a drawing in the style of {}",
    "an image in the style of {}", "a rendering in the style of {}", "a small painting in the style of {}",
    "a large picture in the style of {}", "artwork in the style of {}", "a cropped painting in the style of {}",
)


@dataclass
class TokenSlot:
    """The new rows of one text encoder: their ids, initial values and the trainable offset."""

    attr: str  # pipeline attribute of the text encoder
    text_encoder: object
    tokenizer: object
    ids: list  # token ids of every new row, token by token (tok, tok_1, ...)
    anchor: object  # [rows, dim] fp32 initial vectors
    delta: object  # torch.nn.Parameter [rows, dim]: the rows are anchor + scale * delta
    lookup: object  # LongTensor [vocab]: row index of each new id, -1 elsewhere
    spans: list  # per placeholder token: slice of its rows


def pivotal_peft_config(cfg: TextualInversionTrainConfig):
    """peft's config for the pivotal-tuning adapter: the `lora:` settings or an OFT of adapter_options.block_size."""
    targets = cfg.adapter_options.target_modules
    if cfg.adapter == "lora":
        return lora_config(cfg.lora, targets)
    if cfg.adapter == "oft":
        return oft_config(cfg.adapter_options.block_size, targets)
    raise DcustomError(f"adapter: {cfg.adapter!r} is not known; accepted: none, lora, oft.")


class TextualInversionMethod(FidelityTracking, SubjectMethod):
    def __init__(self, cfg: TextualInversionTrainConfig, pipe=None):
        self.cfg = cfg
        # The hold on prompts without the tokens only matters with an adapter: the vectors never reach them.
        keep = cfg.keep_prompts if cfg.adapter != "none" else ()
        self.objective = DenoisingObjective(cfg.model, cfg.data, cfg.min_snr_gamma, cfg.noise_offset, pipe,
                                            keep_prompts=keep, keep_weight=cfg.keep_weight)
        self.adapter_params = {}  # the pivotal-tuning adapter's parameters (empty without one)
        self.frozen_deltas = None
        self.held_adapter = None

    # --- loop interface -------------------------------------------------------------------
    def setup(self, ctx: LoopContext):
        cfg = self.cfg
        self.ctx = ctx
        pipe = self.objective.load(ctx)  # no text-encoder LoRA: only the new rows learn on the text side
        self.scale = cfg.embedding_lr / ctx.cfg.lr if cfg.embedding_lr else 1.0
        self.slots = [self._add_tokens(attr, tok) for attr, tok in zip(self.family.text_encoders, self.family.tokenizers)]
        if cfg.adapter != "none":
            check_targets(pipe.unet, cfg.adapter_options.target_modules,
                          cfg.adapter_options.block_size if cfg.adapter == "oft" else None)
            pipe.unet.add_adapter(pivotal_peft_config(cfg))
        # The UNet was frozen above, so what requires grad now is exactly the adapter.
        self.adapter_params = {f"unet.{n}": p for n, p in pipe.unet.named_parameters() if p.requires_grad}
        pipe.unet.to(dtype=ctx.weight_dtype)
        for te in self.objective.text_encoders:
            te.to(dtype=ctx.weight_dtype)
        self._write_rows()
        if ctx.cfg.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
        pipe.unet.train()
        self.objective.prepare_examples()  # text is never cached: the new rows change every step
        self._check_captions()
        if cfg.data.prior.enabled:
            self.objective.prepare_class_examples()
        self.embedding_steps = round(cfg.embedding_fraction * ctx.cfg.steps)
        if ctx.is_main:
            self._make_judge(thing=cfg.tokens[0])
        return list(range(len(self.objective.examples)))

    def trainable_parameters(self):
        named = {f"embeddings.{slot.attr}": slot.delta for slot in self.slots}
        named.update(self.adapter_params)
        return named

    def training_step(self, batch, step):
        train_vectors = step < self.embedding_steps
        if not train_vectors and self.frozen_deltas is None:
            self.frozen_deltas = [slot.delta.detach().clone() for slot in self.slots]
        hold = self.cfg.adapter != "none" and step < self.cfg.adapter_options.start_step
        if hold and self.held_adapter is None:
            self.held_adapter = {n: p.detach().clone() for n, p in self.adapter_params.items()}
        examples = [self._with_prompt(self.objective.examples[i]) for i in batch]
        # The hook also serves frozen vectors: after a resume the matrix rows are only rewritten after a step.
        with self._spliced(train_vectors), self._adapter_frozen(hold):
            return self.objective.loss_with_prior(examples)

    def after_optimizer_step(self, step):
        import torch

        done = step - 1  # the 0-based step just applied
        with torch.no_grad():
            if done >= self.embedding_steps and self.frozen_deltas is not None:
                for slot, saved in zip(self.slots, self.frozen_deltas):
                    slot.delta.copy_(saved)
            if self.held_adapter is not None:
                for name, saved in self.held_adapter.items():
                    self.adapter_params[name].copy_(saved)
                if done + 1 >= self.cfg.adapter_options.start_step:
                    self.held_adapter = None
        self._write_rows()

    def save(self, folder: Path, best: bool = False) -> list[Path]:
        from dcustom.adapters.embeddings import save_embedding
        from dcustom.adapters.files import dcustom_metadata

        cfg = self.cfg
        family = self.family.name
        method = "textual_inversion" if cfg.adapter == "none" else f"textual_inversion+{cfg.adapter}"
        meta = dcustom_metadata(method, cfg.model, family, to_dict(cfg), "textual_inversion")
        out = []
        rows = {slot.attr: self.rows(slot).detach().float().cpu() for slot in self.slots}
        for i, token in enumerate(cfg.tokens):
            vectors = {slot.attr: rows[slot.attr][slot.spans[i]] for slot in self.slots}
            out += save_embedding(folder, token, vectors, family, meta, single=len(cfg.tokens) == 1)
        if cfg.adapter != "none":
            adapter_meta = dcustom_metadata(cfg.adapter, cfg.model, family, to_dict(cfg), cfg.adapter,
                                            peft_version=peft_version())
            final = Path(folder) == Path(self.ctx.cfg.output_dir)  # checkpoints get the adapter only
            final = final or (best and cfg.adapter == "lora")  # best/ gets the kohya file other tools load
            out += save_adapter_files(folder, self.pipe, family, cfg.adapter, adapter_meta, final=final,
                                      dora=cfg.lora.dora, write_kohya=cfg.adapter_options.write_kohya).paths
        return out

    def sample(self, step: int, folder: Path) -> list[Path]:
        return self.objective.render_samples(folder, self.cfg.validation_prompts, self.cfg.sample_steps,
                                             self.cfg.sample_seed)

    # --- the new rows ----------------------------------------------------------------------
    def rows(self, slot: TokenSlot, trainable: bool = False):
        delta = slot.delta if trainable else slot.delta.detach()
        return slot.anchor.to(delta.device) + self.scale * delta

    def _add_tokens(self, attr: str, tokenizer_attr: str) -> TokenSlot:
        """Add every placeholder (and its _1.. names) to one tokenizer; grow the frozen matrix; set initial rows."""
        import torch

        from dcustom.adapters.embeddings import existing_token, token_names

        cfg = self.cfg
        te, tok = getattr(self.pipe, attr), getattr(self.pipe, tokenizer_attr)
        base = te.get_input_embeddings().weight.detach().float().clone()
        names, anchors, spans = [], [], []
        for i, token in enumerate(cfg.tokens):
            for name in token_names(token, cfg.num_vectors):
                how = existing_token(tok, name)
                if how:
                    raise DcustomError(f"tokens: {name!r} already exists in the {tokenizer_attr} as {how}; pick a new "
                                       "word such as '<my-subject>' (an existing word would change its meaning).")
            word = cfg.init_words[i] if len(cfg.init_words) > 1 else cfg.init_words[0]
            anchors.append(self._initial_rows(base, tok, word, token))
            spans.append(slice(len(names), len(names) + cfg.num_vectors))
            names += token_names(token, cfg.num_vectors)
        tok.add_tokens(names)
        for token in cfg.tokens:
            pieces = tok.tokenize(f"a {token}")
            if token not in pieces:
                raise DcustomError(f"tokens: {token!r} is not kept whole by the {tokenizer_attr} (it reads {pieces[1:]}); "
                                   "use a lowercase word without spaces, e.g. '<my-subject>'.")
        te.resize_token_embeddings(len(tok), mean_resizing=False)
        te.get_input_embeddings().weight.requires_grad_(False)
        ids = tok.convert_tokens_to_ids(names)
        lookup = torch.full((len(tok),), -1, dtype=torch.long, device=te.device)
        lookup[torch.tensor(ids, device=te.device)] = torch.arange(len(ids), device=te.device)
        anchor = torch.cat(anchors).to(te.device)
        delta = torch.nn.Parameter(torch.zeros_like(anchor))
        return TokenSlot(attr, te, tok, ids, anchor, delta, lookup, spans)

    def _initial_rows(self, base, tok, word: str, token: str):
        """num_vectors rows from a word: its sub-tokens one each when the counts match, else their mean."""
        n = self.cfg.num_vectors
        if not word.strip():
            return base.mean(0, keepdim=True).repeat(n, 1)
        ids = tok(word, add_special_tokens=False).input_ids
        if not ids:
            raise DcustomError(f"init_words: {word!r} (for {token!r}) gives no tokens; pick a plain word such as 'toy', or '' for the vocabulary mean.")
        vecs = base[ids]
        return vecs.clone() if len(ids) == n else vecs.mean(0, keepdim=True).repeat(n, 1)

    def _write_rows(self) -> None:
        """Put the current rows into the (frozen) embedding matrices, so the plain pipeline uses them."""
        import torch

        with torch.no_grad():
            for slot in self.slots:
                weight = slot.text_encoder.get_input_embeddings().weight
                weight[torch.tensor(slot.ids, device=weight.device)] = self.rows(slot).to(weight.device, weight.dtype)

    @contextlib.contextmanager
    def _spliced(self, trainable: bool):
        """During a training step, route the new rows' lookups to `anchor + scale * delta` (with gradients
        when `trainable`)."""
        import torch

        handles = []

        def make_hook(slot):
            def hook(module, args, output):
                ids = args[0]
                pos = slot.lookup.to(ids.device)[ids]
                mask = pos >= 0
                if not bool(mask.any()):
                    return output
                picked = self.rows(slot, trainable).to(output.device, output.dtype)[pos.clamp(min=0)]
                return torch.where(mask.unsqueeze(-1), picked, output)
            return hook

        try:
            for slot in self.slots:
                handles.append(slot.text_encoder.get_input_embeddings().register_forward_hook(make_hook(slot)))
            yield
        finally:
            for h in handles:
                h.remove()

    # --- the adapter of pivotal tuning -------------------------------------------------------
    @contextlib.contextmanager
    def _adapter_frozen(self, hold: bool):
        """Before the adapter's start step, run it without gradients (it stays at its identity init)."""
        params = list(self.adapter_params.values()) if hold else []
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    # --- prompts -------------------------------------------------------------------------------
    def _with_prompt(self, example):
        import torch

        if self.cfg.prompts == "captions":
            return example
        templates = STYLE_TEMPLATES if self.cfg.learnable_property == "style" else OBJECT_TEMPLATES
        template = templates[int(torch.randint(len(templates), ()).item())]
        return replace(example, caption=template.format(" ".join(self.cfg.tokens)))

    def _check_captions(self) -> None:
        if self.cfg.prompts != "captions":
            return
        examples = self.objective.examples
        without = [ex.caption for ex in examples if not any(t in ex.caption for t in self.cfg.tokens)]
        if len(without) == len(examples):
            raise DcustomError(f"data: no caption contains a placeholder token ({', '.join(self.cfg.tokens)}), e.g. "
                               f"{without[0]!r}; put the token in data.instance_prompt or the .txt captions, or use prompts: templates.")
        if without:
            log.warning("%d of %d captions contain no placeholder token (e.g. %r); they train the adapter only.",
                        len(without), len(examples), without[0])


def train(cfg: TextualInversionTrainConfig, pipe=None, on_event=None, should_stop=None, progress: bool = True):
    """Python API: textual inversion (or pivotal tuning); returns the loop's TrainResult (run folder, files)."""
    method = TextualInversionMethod(cfg, pipe=pipe)
    result = run_training(method, cfg.train, run_config=cfg, on_event=on_event, should_stop=should_stop, progress=progress)
    result.method = method
    return result


def run(cfg: TextualInversionTrainConfig):
    """Registry entry point (`dcustom train textual_inversion`)."""
    result = train(cfg)
    print(f"used {len(result.method.used)} image(s) from {cfg.data.images}")
    for path, why in result.method.skipped:
        print(f"skipped {path}: {why}")
    return result
