"""Shared-prefix trees for vision-language preference data: the prompt (text + images) once, each
answer a branch of it (:class:`MultimodalTreeCollator`; docs/preference.md, "Vision-language").

An example is a prompt as the family's processor returns it for ONE prompt (batch dimension 1:
``input_ids``, ``pixel_values``, ``image_grid_thw``, token types, ...) plus its answers:
``chosen_ids`` and ``rejected_ids`` (DPO) or ``completion_ids``, a list of G token lists (GRPO).
Several examples share a row (best fit over the call, whole examples only). Per tree:

* the prompt's tokens and its vision inputs appear once; the vision inputs are concatenated in the
  order the prompts sit in the rows, as the model scatters image features in reading order;
* each branch attends to its prompt and to itself (:func:`packmask.masks.tree_mask_from_segments`),
  and the family's rule stays inside the prompt: Gemma 3's image tokens see their whole image,
  PaliGemma's prefix (``token_type_ids == 0``, the whole prompt) sees all of itself, answers are
  its suffix (``token_type_ids = 1``);
* positions of each branch are exactly the model's for ``prompt + branch`` alone: the depth in the
  tree (PaliGemma: from 1), and for mRoPE families the model's own ``get_rope_index`` called on
  each ``prompt + branch`` path, whose branch part is taken (the prompt part must agree across
  branches, else :class:`~packmask.UnsupportedModelError`). The text row restarts per tree.

Worked example (Qwen2.5-VL; prompt ``p0 <vs> I I I I <ve>``, a 2x2 merged image; chosen ``c0 c1``,
rejected ``r0``)::

    tokens     p0 <vs> I  I  I  I <ve> c0 c1 r0
    text row    0   1  2  3  4  5   6   7  8  7     <- the tree's depth: r0 continues the prompt
    temporal    0   1  2  2  2  2   4   5  6  5
    height      0   1  2  2  3  3   4   5  6  5
    width       0   1  2  3  2  3   4   5  6  5
    mask row r0 1   1  1  1  1  1   1   .  .  1     <- the prompt and itself, never c0 c1

>>> from packmask.multimodal.tiny import IMG, VE, VS, tiny_vlm
>>> example = dict(input_ids=torch.tensor([[5, VS, IMG, IMG, IMG, IMG, VE]]),
...                mm_token_type_ids=torch.tensor([[0, 0, 1, 1, 1, 1, 0]]), pixel_values=torch.zeros(16, 96),
...                image_grid_thw=torch.tensor([[1, 4, 4]]), chosen_ids=[7, 8], rejected_ids=[9])
>>> batch = MultimodalTreeCollator(tiny_vlm("qwen2_5_vl"))([example])
>>> batch["position_ids"][:, 0, 7:].tolist()     # c0 c1 r0 on the text, temporal, height, width rows
[[7, 8, 7], [5, 6, 5], [5, 6, 5], [5, 6, 5]]
>>> batch["attention_mask"][0, 9].int().tolist()
[1, 1, 1, 1, 1, 1, 1, 0, 0, 1]

The batch holds the model inputs (``use_cache=False``) and the bookkeeping of
:func:`packmask.branch_logps` (:data:`packmask.data.tree_collator.BRANCH_KEYS`, plus
``num_examples``, ``branch_tokens``, ``unpacked_tokens``): pop those before ``model(**batch)``, or
use :func:`model_inputs`.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import torch

from ..data.spans import lengths_from_offsets, offsets_from_lengths, positions_from_lengths
from ..data.tree import Forest, pack_forest
from ..data.tree_collator import BRANCH_KEYS, collate_forest, segment_starts
from ..errors import PackmaskError, UnsupportedModelError
from .attention import block_ids
from .collator import MultimodalCollator
from .families import TOKEN_KEYS, call_rope_index, rope_index_function, takes_text_row

__all__ = ["MultimodalTreeCollator", "model_inputs", "is_vlm_tree_dataset", "TREE_BOOKKEEPING", "ANSWER_KEYS"]

#: batch keys that are not model arguments
TREE_BOOKKEEPING = tuple(BRANCH_KEYS) + ("num_examples", "branch_tokens", "unpacked_tokens", "ref_chosen_logps",
                                         "ref_rejected_logps")
#: the answer keys of an example: a preference pair, or a group of completions
ANSWER_KEYS = ("chosen_ids", "rejected_ids", "completion_ids")
_TYPE_KEYS = tuple(k for k in TOKEN_KEYS if k not in ("input_ids", "labels"))
_IMAGE_TOKEN_ATTRS = ("image_token_id", "image_token_index", "video_token_id", "image_token")


def model_inputs(batch: dict) -> dict:
    """The model's arguments of a :class:`MultimodalTreeCollator` batch (the bookkeeping dropped)."""
    return {k: v for k, v in batch.items() if k not in TREE_BOOKKEEPING}


def is_vlm_tree_dataset(dataset) -> bool:
    """Whether ``dataset``'s examples are this collator's: a prompt's processor output (``input_ids``)
    beside ``chosen_ids`` / ``rejected_ids`` or ``completion_ids``."""
    try:
        first = next(iter(dataset))
    except (StopIteration, TypeError):
        return False
    return isinstance(first, dict) and "input_ids" in first and any(k in first for k in ANSWER_KEYS)


def _as_tensor(value):
    """A prompt field as a tensor: a dataset read without ``with_format("torch")`` (or one TRL extended with
    precomputed reference log-probs, which drops the format) gives nested lists and numpy arrays."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, (list, tuple)):
        try:
            return torch.tensor(value)
        except (TypeError, ValueError):
            return value  # not numbers: the checks below name the field
    return value


def _token_list(value, where: str) -> np.ndarray:
    """An answer's token ids as an int64 array (checked as a whole: no Python loop per token)."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 2 and value.shape[0] == 1:
            value = value[0]
        if value.dim() != 1:
            raise PackmaskError(f"{where} must be a list of token ids or a [n] / [1, n] tensor, got shape "
                                f"{tuple(value.shape)}.")
        value = value.cpu().numpy()
    array = np.asarray(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    if array is not None and array.size == 0:
        raise PackmaskError(f"{where} is empty: an answer needs at least one token to score; filter the example.")
    if array is None or array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise PackmaskError(f"{where} must be a list of token ids, got {type(value).__name__}.")
    return array.astype(np.int64, copy=False)


def _answers(example: dict, at: str) -> tuple[list[list[int]], list[int]]:
    """``(branches, kinds)`` of one example: chosen (1) and rejected (2), or G completions (1)."""
    if "completion_ids" in example:
        group = example["completion_ids"]
        if isinstance(group, torch.Tensor):
            group = list(group)
        if not isinstance(group, (list, tuple)) or not group:
            raise PackmaskError(f"{at}: completion_ids must be a non-empty list of completions (token lists).")
        return [_token_list(c, f"{at}: completion_ids[{g}]") for g, c in enumerate(group)], [1] * len(group)
    missing = [k for k in ("chosen_ids", "rejected_ids") if k not in example]
    if missing:
        raise PackmaskError(f"{at} lacks {missing}: give chosen_ids and rejected_ids (DPO) or completion_ids "
                            f"(a list of completions, GRPO) beside the prompt's processor output.")
    return [_token_list(example[k], f"{at}: {k}") for k in ("chosen_ids", "rejected_ids")], [1, 2]


class MultimodalTreeCollator:
    """Collate vision-language preference examples (or completion groups) into shared-prefix tree rows.

    Args:
        model: the ``*ForConditionalGeneration`` to train, on ``attn_implementation="packmask"`` (a family of
            :mod:`packmask.multimodal.families`; others raise :class:`~packmask.UnsupportedModelError`).
        row_length: tokens per row; whole examples are packed by best fit. None: one row per call.
        max_length: the longest ``prompt + answer`` path, as TRL's ``max_length``: a longer answer is cut at its
            end (TRL's ``keep_start``); a prompt that leaves no room for an answer raises (its image tokens
            cannot be cut). None: no limit.
        pad_token_id: written into row padding (default: the model's, else 0).
        pad_to_multiple_of: round the row length up, for static shapes.

    Every example holds its prompt's processor output (batch dimension 1, unpadded, no answer tokens)
    and ``chosen_ids`` + ``rejected_ids`` or ``completion_ids``; all examples of a call are of one kind.
    The answers are text: image or video tokens in an answer are refused (put images in the prompt).
    """

    def __init__(self, model, row_length: int | None = None, *, max_length: int | None = None,
                 pad_token_id: int | None = None, pad_to_multiple_of: int | None = None):
        self.samples = MultimodalCollator(model, max_length=row_length, pad_token_id=pad_token_id,
                                          pad_to_multiple_of=pad_to_multiple_of)
        self.family = self.samples.family
        self.row_length = row_length
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        config = model.config
        self.media_tokens = {int(v) for a in _IMAGE_TOKEN_ATTRS for v in [getattr(config, a, None)]
                             if isinstance(v, int) and not isinstance(v, bool)}
        self._media_ids = np.array(sorted(self.media_tokens), dtype=np.int64)
        # PaliGemma: the prompt is the prefix (type 0), the answer its suffix (type 1); elsewhere answers are text (0)
        self.answer_type = 1 if self.family.attention == "prefix" else 0
        self.rope_index = rope_index_function(model) if self.family.positions == "mrope" else None
        self.text_row = self.rope_index is None or takes_text_row(model)

    # ---- one example ----------------------------------------------------------------------
    def _prompt(self, example: dict, at: str) -> tuple[dict, list[int]]:
        prompt = {k: _as_tensor(v) for k, v in example.items() if k not in ANSWER_KEYS and k not in TREE_BOOKKEEPING
                  and k != "labels"}
        ids = prompt.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise PackmaskError(f"{at}: input_ids must be the prompt's non-empty [1, tokens] tensor (the "
                                f"processor's output for one prompt, return_tensors='pt').")
        mask = prompt.pop("attention_mask", None)
        if isinstance(mask, torch.Tensor) and not bool(mask.bool().all()):
            raise PackmaskError(f"{at}: the prompt's attention_mask has padding; process each prompt alone "
                                f"(padding=False).")
        n = ids.shape[1]
        for key in _TYPE_KEYS:
            t = prompt.get(key)
            if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (1, n)):
                raise PackmaskError(f"{at}: {key} must be a [1, {n}] tensor like input_ids.")
        if self.family.attention == "prefix" and prompt.get("token_type_ids") is not None \
                and bool((prompt["token_type_ids"] != 0).any()):
            raise PackmaskError(f"{at}: the prompt holds suffix tokens (token_type_ids == 1); on a prefix-LM "
                                f"the prompt is the prefix and the answers are the suffix: process the prompt alone.")
        return prompt, ids[0].tolist()

    def _rope_rows(self, prompt: dict, branches: list[np.ndarray], at: str) -> list[torch.Tensor]:
        """``[3, len]`` mRoPE rows of the prompt, then of each branch: the model's ``get_rope_index`` on
        each ``prompt + branch`` path, the branch part taken."""
        ids = prompt["input_ids"].cpu()
        types = prompt.get("mm_token_type_ids")
        # on the host with the ids: a prompt moved to the GPU would mix devices inside get_rope_index
        grids = {k: v.cpu() if isinstance(v, torch.Tensor) else v
                 for k, v in ((k, prompt.get(k)) for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts"))}
        out, P = [], ids.shape[1]
        for b in branches:
            path = torch.cat([ids, torch.as_tensor(b, dtype=ids.dtype)[None]], 1)
            path_types = None if types is None else torch.cat([types.cpu(), torch.zeros(1, len(b), dtype=types.dtype)], 1)
            rope = call_rope_index(self.rope_index, input_ids=path, mm_token_type_ids=path_types,
                                   attention_mask=torch.ones_like(path), **grids)[:, 0].to(torch.long).cpu()
            if not out:
                out.append(rope[:, :P])
            elif not torch.equal(out[0], rope[:, :P]):
                raise UnsupportedModelError(f"{at}: the model's get_rope_index gives the prompt different "
                                            f"positions depending on the answer, so the prompt cannot be shared; "
                                            f"train this model on unshared (one sequence per answer) rows.")
            out.append(rope[:, P:])
        return out

    # ---- the batch ------------------------------------------------------------------------
    def __call__(self, examples: Sequence[dict]) -> dict[str, Any]:
        if not examples:
            raise PackmaskError("MultimodalTreeCollator got no examples.")
        groups = {"completion_ids" in ex for ex in examples}
        if len(groups) > 1:
            raise PackmaskError("some examples hold completion_ids and some chosen_ids/rejected_ids: one kind per batch.")
        prompts, segments, parents, example, kind, ropes, unpacked = [], [], [], [], [], [], 0
        for e, ex in enumerate(examples):   # one loop per example (the batch), none per token
            at = f"example {e} of the batch"  # the position in this call, not in the dataset
            prompt, prompt_ids = self._prompt(ex, at)
            branches, kinds = _answers(ex, at)
            if self.max_length is not None:
                room = self.max_length - len(prompt_ids)
                if room < 1:
                    raise PackmaskError(f"{at}: the prompt has {len(prompt_ids)} tokens, max_length="
                                        f"{self.max_length} leaves no answer token (a prompt's image tokens are never "
                                        f"cut); raise max_length or drop the example.")
                branches = [b[:room] for b in branches]
            for g, b in enumerate(branches):
                if np.isin(b, self._media_ids).any():
                    raise PackmaskError(f"{at}, answer {g} holds image/video tokens; answers are text: put the "
                                        f"images in the prompt.")
            prompts.append(prompt)
            segments += [prompt_ids] + branches
            parents += [-1] + [0] * len(branches)
            kind += [0] + kinds
            example += [e] * (len(branches) + 1)
            unpacked += len(prompt_ids) * len(branches) + sum(map(len, branches))
            if self.rope_index is not None:
                ropes += self._rope_rows(prompt, branches, at)
        flat_ids = np.concatenate([np.asarray(s, np.int64) for s in segments])
        lengths = [len(s) for s in segments]
        # pack a forest of token indices: each packed token says where it came from (ids, types, mRoPE rows)
        index = Forest.from_segments(np.split(np.arange(flat_ids.shape[0]), offsets_from_lengths(lengths)[1:-1]),
                                     parents, example, kind, [k != 0 for k in kind])
        sizes = index.example_sizes()[1]
        row_length = self.row_length if self.row_length is not None else int(sizes.sum())
        packed = pack_forest(index, row_length)
        source = packed.tokens
        pad_id = self.samples.pad_token_id
        batch = collate_forest(replace(packed, tokens=flat_ids[source]), pad_token_id=pad_id,
                               pad_to_multiple_of=self.pad_to_multiple_of)
        R, N = batch["input_ids"].shape
        flat = np.repeat(np.arange(R), packed.row_lengths()) * N + positions_from_lengths(packed.row_lengths())
        starts = torch.from_numpy(segment_starts(packed, N))
        for key in sorted({k for p in prompts for k in p if k in _TYPE_KEYS}):
            per_segment, prompt_iter = [], iter(prompts)
            for k, n in zip(kind, lengths):  # a prompt's own types; answers: the family's answer type
                p = next(prompt_iter) if k == 0 else None
                per_segment.append(p[key][0].cpu().numpy() if p is not None and key in p
                                   else np.full(n, 0 if k == 0 else self.answer_type, np.int64))
            filled = np.zeros(R * N, np.int64)
            filled[flat] = np.concatenate(per_segment)[source]
            batch[key] = torch.from_numpy(filled.reshape(R, N))
        text = batch["position_ids"] + self.family.first_position
        if self.rope_index is not None:
            rows = np.zeros((3, R * N), np.int64)
            rows[:, :] = text.reshape(1, -1).numpy()  # padding: 0, 1, ... on every row
            rows[:, flat] = torch.cat(ropes, 1).numpy()[:, source]
            mrope = torch.from_numpy(rows.reshape(3, R, N))
            text = torch.cat([text[None], mrope]) if self.text_row else mrope
        batch["position_ids"] = text
        types = batch.get("token_type_ids", batch.get("mm_token_type_ids"))
        blocks = block_ids(starts, types, self.family.attention)
        if blocks is not None:  # the family's bidirectional blocks (inside prompts only) over the tree
            batch["attention_mask"] = batch["attention_mask"] | (
                (blocks[:, :, None] == blocks[:, None, :]) & (blocks >= 0)[:, :, None])
        batch["num_examples"] = torch.tensor(len(examples))
        batch["branch_tokens"] = batch["branch_length"].clone()
        batch["unpacked_tokens"] = torch.tensor(unpacked)
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([float(ex[key]) for ex in examples])
        device = prompts[0]["input_ids"].device
        batch = {k: v.to(device) for k, v in batch.items()}
        order = _row_order(packed)
        batch.update(self.samples.vision_inputs([[prompts[e] for e in row] for row in order]))
        batch["use_cache"] = False
        return batch


def _row_order(packed) -> list[list[int]]:
    """The examples of every row, in the order their prompts sit in it."""
    is_prompt = packed.seg_kind == 0
    rows = np.repeat(np.arange(packed.num_rows), lengths_from_offsets(packed.seg_row_offsets))
    return [packed.seg_example[is_prompt & (rows == r)].tolist() for r in range(packed.num_rows)]
