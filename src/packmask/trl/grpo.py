"""``PackedGRPOTrainer``: ``trl.GRPOTrainer`` whose log-prob passes run on shared-prefix tree rows.

GRPO scores G completions of each prompt. TRL's log-prob passes (policy, reference, old policy) run
``[prompt | completion]`` rows, left-padded prompts and right-padded completions, so every prompt is
computed G times. This subclass overrides the one method those passes go through,
``_get_per_token_logps_and_entropies``: consecutive rows with the same prompt become one tree (the
prompt once, each completion a branch), packed into rows, and the per-token log-probs (and entropies)
are scattered back into TRL's ``[B, logits_to_keep]`` layout. Generation, rewards and the loss are TRL's.
A completion masked out whole (``mask_truncated_completions=True`` on a truncated one) is left out of the
trees and scored 0, as TRL's fused head scores every masked position; the rest of its chunk stays on trees.
With ``cast_lm_head_to_fp32=True`` the LM head runs in fp32 outside autocast, as in TRL's fused head.

Vision-language rows (``pixel_values``, ``image_grid_thw``, token types, ...) become
:class:`~packmask.multimodal.tree.MultimodalTreeCollator` trees: the prompt, its image tokens and its
images once per group, positions from the model's own ``get_rope_index`` per path
(:mod:`packmask.trl.grpo_vlm`; every family with a packing rule but PaliGemma: Qwen, Gemma 3, LLaVA,
LLaVA-NeXT and Mistral 3 with ``image_sizes``, Idefics3 / SmolVLM tiles). Rows TRL cannot lay out as
trees here -- the MoE aux loss, a completion mask that is not a prefix, image tokens in a completion, a
vision layout not cut per row (``spatial_shapes``, ``num_tiles``), a prefix-LM (PaliGemma: TRL types its
completions as prefix) or a model without a multimodal packing rule -- go through TRL's own method unchanged.

Recipe::

    from packmask.trl import PackedGRPOTrainer
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="packmask")   # or model = name
    trainer = PackedGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(num_generations=8, ...),
                                train_dataset=prompts, processing_class=tokenizer)
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from trl import GRPOTrainer

from ..data.logps import branch_logps, per_branch_padded
from ..data.branch_forest import TreePackingStats, prompt_branch_forest
from ..data.spans import offsets_from_lengths, run_lengths, run_starts
from ..data.tree import pack_forest
from ..data.tree_collator import collate_forest
from ..errors import PackmaskError, UnsupportedModelError
from ..multimodal.tree import MultimodalTreeCollator, model_inputs
from .grpo_layout import prompt_completion_lengths
from .grpo_vlm import TOKEN_TYPE_KWARGS, VISION_KWARGS, completion_groups, vision_rows
from .model_init import packmask_model_init_kwargs

__all__ = ["PackedGRPOTrainer", "group_rows", "rows_scattered", "lm_head_in_fp32"]

_MULTIMODAL = VISION_KWARGS + TOKEN_TYPE_KWARGS


def group_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int, row_length: int | None = None,
               pad_token_id: int = 0):
    """TRL's padded ``[prompt | completion]`` rows -> ``(batch, rows)``: a packed tree batch of the rows
    with a completion and those rows' indices (the branches in turn; ``batch`` is ``None`` when no row has
    one), or ``None`` when the rows do not have that form (a completion mask that is not a prefix, an empty
    prompt). Rows ``i`` and ``j`` share a tree when their prompts (tokens and padding) are identical and no
    row between them has another prompt. A row whose completion is masked out whole
    (``mask_truncated_completions``) is no branch; TRL scores it 0 everywhere::

        row 0   pad p0 p1   c0 c1 pad      ->  tree: p0 p1 ┬ c0 c1      rows [0, 2]
        row 1   pad p0 p1   d0 d1 d2 (masked)           └ e0
        row 2   pad p0 p1   e0 pad pad

    >>> ids = torch.tensor([[0, 5, 6, 7, 8, 0], [0, 5, 6, 9, 9, 9], [0, 5, 6, 4, 0, 0]])
    >>> mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0]])
    >>> batch, rows = group_rows(ids, mask, 3)
    >>> batch["input_ids"].tolist(), rows.tolist()
    ([[5, 6, 7, 8, 4]], [0, 2])
    """
    K = logits_to_keep
    lengths = prompt_completion_lengths(attention_mask, K)
    if lengths is None:
        return None
    p_len, c_len = lengths
    ids = input_ids.detach().cpu().numpy()
    mask = attention_mask.detach().cpu().numpy().astype(bool)
    rows = np.flatnonzero(c_len > 0)   # a completion masked out whole is scored by nobody
    if rows.size == 0:
        return None, torch.as_tensor(rows, device=input_ids.device)
    ids, mask, c_len, p_len = ids[rows], mask[rows], c_len[rows], p_len[rows]
    p_ids, p_mask, c_ids, c_mask = ids[:, :-K], mask[:, :-K], ids[:, -K:], mask[:, -K:]
    new_group = run_starts(np.concatenate([p_ids, p_mask], 1))   # a new prompt (tokens or padding) starts a tree
    firsts = np.flatnonzero(new_group)
    sizes = run_lengths(new_group)
    p_vals, c_vals = p_ids[firsts][p_mask[firsts]], c_ids[c_mask]
    p_starts = offsets_from_lengths(p_len[firsts])[:-1]
    c_starts = offsets_from_lengths(c_len)[:-1] + p_vals.shape[0]
    big = int(p_len[firsts].max() + np.add.reduceat(c_len, firsts).max())
    stats = TreePackingStats(max_length=big, overflow="error", truncation_mode="keep_start")
    forest = prompt_branch_forest(np.concatenate([p_vals, c_vals]), p_starts, p_len[firsts], c_starts, c_len, sizes,
                                  np.ones(rows.size, np.int64), big, "error", "keep_start", stats, "completion")
    total = int(forest.tokens.shape[0])
    packed = pack_forest(forest, max(row_length or total, big))
    batch = collate_forest(packed, pad_token_id=pad_token_id, device=input_ids.device)
    return batch, torch.as_tensor(rows, device=input_ids.device)


def rows_scattered(parts: list, num_rows: int, logits_to_keep: int, compute_entropy: bool):
    """``(rows, logps, entropies)`` per scored chunk -> TRL's ``[num_rows, logits_to_keep]`` log-probs (and
    entropies); rows in no chunk (completion masked out whole) get 0, as TRL's fused head gives them.

    >>> lp, ent = rows_scattered([(torch.tensor([0, 2]), torch.ones(2, 2), None)], 3, 2, False)
    >>> lp.tolist(), ent
    ([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]], None)
    """
    logps = parts[0][1].new_zeros(num_rows, logits_to_keep)
    entropies = logps.clone() if compute_entropy else None
    for rows, lp, ent in parts:
        rows = torch.as_tensor(rows, device=lp.device)
        logps = logps.index_put((rows,), lp)
        entropies = entropies.index_put((rows,), ent) if compute_entropy else None
    return logps, entropies


@contextmanager
def lm_head_in_fp32(model):
    """Within the block, ``model``'s output embedding runs outside autocast on fp32 inputs -- what TRL's
    fused head does with ``cast_lm_head_to_fp32=True`` (TRL has already made its weight fp32). Hooks on
    that one module of this one instance, removed on exit."""
    head = model.get_output_embeddings()
    if head is None:
        raise PackmaskError(f"PackedGRPOTrainer: cast_lm_head_to_fp32=True but {type(model).__name__} has no output "
                            "embedding; set cast_lm_head_to_fp32=False.")
    pending = []   # autocast contexts opened by the pre-hook, closed by the forward hook

    def enter(module, args):
        pending.append(torch.autocast(args[0].device.type, enabled=False))
        pending[-1].__enter__()
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def leave(module, args, output):
        pending.pop().__exit__(None, None, None)

    handles = [head.register_forward_pre_hook(enter), head.register_forward_hook(leave, always_call=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class PackedGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with tree-packed log-prob passes (module docstring). Extra argument:
    ``row_length`` -- tokens per packed row (``None``: each chunk of ``batch_size`` rows in one row)."""

    def __init__(self, model, reward_funcs=None, args=None, *rest, row_length: int | None = None, **kwargs):
        if args is None and isinstance(model, str):  # TRL's default, made here so it can load with packmask
            from trl import GRPOConfig
            args = GRPOConfig(f"{model.split('/')[-1]}-GRPO")
        args = packmask_model_init_kwargs(model, args, "PackedGRPOTrainer")  # a name / path loads with packmask
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        self.row_length = row_length
        self._tree_collators = {}   # (id(model), row_length) -> MultimodalTreeCollator or None
        impl = getattr(self.model.config, "_attn_implementation", None)
        if impl != "packmask":
            raise PackmaskError(f"PackedGRPOTrainer: the model uses attn_implementation={impl!r}; tree rows need a "
                                "[B, N, N] mask: load it with attn_implementation='packmask' (after import packmask), "
                                "or pass the model's name or path and the trainer loads it so.")

    def _tree_collator(self, model, row_length: int) -> MultimodalTreeCollator | None:
        """The vision-language tree collator of ``model``; ``None`` where its rows stay TRL's (no packing
        rule, or a prefix-LM whose completions TRL types as prefix)."""
        model = self.accelerator.unwrap_model(model)
        key = (id(model), row_length)   # built once per model (policy, reference) and row length
        cache = self._tree_collators
        if key not in cache:
            try:
                collator = MultimodalTreeCollator(model, row_length)
                cache[key] = None if collator.family.attention == "prefix" else collator
            except UnsupportedModelError:
                cache[key] = None
        return cache[key]

    def _vlm_tree_chunks(self, model, input_ids, attention_mask, logits_to_keep, batch_size, multimodal):
        """Per TRL memory chunk, ``(collator, examples, rows)``: its trees and which of its rows are their
        branches (:func:`~packmask.trl.grpo_vlm.completion_groups`); ``None`` when any chunk is not of tree
        form (then TRL's own method runs them all)."""
        family_collator = self._tree_collator(model, None)   # its family says how vision inputs concatenate
        if family_collator is None:
            return None
        vision = vision_rows(input_ids.shape[0], **{k: multimodal.get(k) for k in VISION_KWARGS},
                             image_dim=family_collator.family.image_dim)
        types = {k: multimodal[k] for k in TOKEN_TYPE_KWARGS if multimodal.get(k) is not None}
        if vision is None:
            return None
        chunks = []
        for start in range(0, input_ids.size(0), batch_size):
            end = min(start + batch_size, input_ids.size(0))
            groups = completion_groups(input_ids[start:end], attention_mask[start:end], logits_to_keep,
                                       vision[start:end], {k: t[start:end] for k, t in types.items()})
            if groups is None:
                return None
            examples, rows = groups
            if not examples:   # every completion masked out: nothing to score
                continue
            biggest = max(ex["input_ids"].shape[1] + sum(map(len, ex["completion_ids"])) for ex in examples)
            collator = self._tree_collator(model, max(self.row_length, biggest) if self.row_length else None)
            if collator is None:
                return None
            chunks.append((collator, examples, [start + r for r in rows]))
        return chunks

    def _branch_logps(self, model, inputs: dict, batch: dict, logits_to_keep: int, compute_entropy: bool):
        """Per-token log-probs (and entropies) of the tree ``batch``, in TRL's ``[B, logits_to_keep]``
        layout; ``inputs``: the model's arguments."""
        fp32_head = lm_head_in_fp32(self.accelerator.unwrap_model(model)) if self.args.cast_lm_head_to_fp32 \
            else nullcontext()
        with self.accelerator.autocast(), fp32_head:
            logits = model(**dict(inputs, use_cache=False, logits_to_keep=batch["logits_to_keep"])).logits
        out = branch_logps(logits, batch, temperature=self.temperature, with_stats=compute_entropy)
        ent = per_branch_padded(out.entropy, batch, logits_to_keep) if compute_entropy else None
        return per_branch_padded(out.per_token, batch, logits_to_keep), ent

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        batch_size = batch_size or input_ids.size(0)

        def unchanged():
            return super(PackedGRPOTrainer, self)._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **multimodal)

        if compute_aux_loss:
            return unchanged()
        parts = []   # (rows, logps, entropies) per scored chunk
        if any(multimodal.get(k) is not None for k in _MULTIMODAL):
            chunks = self._vlm_tree_chunks(model, input_ids, attention_mask, logits_to_keep, batch_size, multimodal)
            if chunks is None:
                return unchanged()
            for collator, examples, rows in chunks:   # collated one at a time: one chunk's tree masks in memory
                batch = collator(examples)
                parts.append((rows, *self._branch_logps(model, model_inputs(batch), batch, logits_to_keep,
                                                        compute_entropy)))
        else:
            for start in range(0, input_ids.size(0), batch_size):   # TRL's memory chunks
                end = min(start + batch_size, input_ids.size(0))
                grouped = group_rows(input_ids[start:end], attention_mask[start:end], logits_to_keep, self.row_length)
                if grouped is None:
                    lp, ent, _ = super()._get_per_token_logps_and_entropies(
                        model, input_ids[start:end], attention_mask[start:end], logits_to_keep, None, compute_entropy)
                    parts.append((torch.arange(start, end, device=lp.device), lp, ent))
                elif grouped[0] is not None:
                    batch, rows = grouped
                    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
                    parts.append((rows + start, *self._branch_logps(model, inputs, batch, logits_to_keep,
                                                                    compute_entropy)))
        if not parts:   # every completion masked out: TRL's zeros, still connected to the model for backward()
            return unchanged()
        return (*rows_scattered(parts, input_ids.shape[0], logits_to_keep, compute_entropy), None)
