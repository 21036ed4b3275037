"""``MultimodalCollator``: pack vision-language samples into rows, each sample exact as if run alone.

It takes per-sample feature dicts, each as the model's processor returns it for ONE sample (batch
dimension 1), and returns the batch dict for ``model(**batch)`` on ``attn_implementation="packmask"``.
Within a row, in the given order:

* token inputs are concatenated (``input_ids``, ``labels`` with each sample's first label set to
  ``-100``, ``token_type_ids`` / ``mm_token_type_ids``); rows are padded to the longest;
* vision inputs are concatenated in the same order (``pixel_values``, ``image_grid_thw``,
  ``image_sizes``, ``pixel_attention_mask``, ...), as the model scatters image features into the
  image tokens in reading order;
* positions are each sample's own, restarting in every sample: the model's ``get_rope_index`` for
  mRoPE families (``[4, B, L]``: the text row, which packmask reads the samples from, then the 3
  mRoPE rows), ``0, 1, ...`` otherwise;
* the attention is the family's rule restricted to the sample: causal families need nothing else
  (the restarting positions are the layout, run on the varlen kernels), Gemma 3 and PaliGemma get a
  ``[B, N, N]`` mask (:mod:`packmask.multimodal.attention`);
* ``use_cache=False``: a cache makes transformers' own mask code treat the row as one sequence.

Worked example (Qwen2.5-VL; ``a`` has a 4-token image, ``b`` is text only; docs/multimodal.md runs it)::

    input_ids      a0 <vs> I I I I <ve> a1 | b0 b1 b2
    labels         -100 ...                | -100 b1 b2        (b's first label: -100)
    position_ids   text row   0 1 2 3 4 5 6 7 | 0 1 2
                   temporal   0 1 2 2 2 2 4 5 | 0 1 2
                   height     0 1 2 2 3 3 4 5 | 0 1 2
                   width      0 1 2 3 2 3 4 5 | 0 1 2

Trainer use: ``Trainer(..., data_collator=MultimodalCollator(model, max_length=8192),
args=TrainingArguments(..., remove_unused_columns=False))``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .. import segments
from ..errors import PackmaskError
from .attention import sample_mask
from .families import TOKEN_KEYS, call_rope_index, family_of, rope_index_function, takes_text_row, uses_packmask

__all__ = ["MultimodalCollator", "pad_cat", "pack_samples"]


def pad_cat(tensors: Sequence[torch.Tensor], dim: int = 0, value=0) -> torch.Tensor:
    """Concatenate along ``dim``, zero-padding every other dimension to the largest (images of
    different sizes; the model crops them back with ``image_sizes``).

    >>> pad_cat([torch.ones(1, 2), torch.ones(2, 3)]).tolist()
    [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """
    shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
    out = []
    for t in tensors:
        pad = []
        for d in reversed(range(t.dim())):
            pad += [0, 0 if d == dim else shape[d] - t.shape[d]]
        out.append(torch.nn.functional.pad(t, pad, value=value) if any(pad) else t)
    return torch.cat(out, dim=dim)


def _length(sample: dict, index: int) -> int:
    ids = sample.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise PackmaskError(f"sample {index}: input_ids must be a [1, tokens] tensor (the processor's output for one "
                            f"sample, return_tensors='pt'), got {shape}.")
    return int(ids.shape[1])


def pack_samples(samples: Sequence[dict], max_length: int, strategy: str = "bfd") -> list[list[dict]]:
    """Group samples into rows of at most ``max_length`` tokens by best fit over all of them
    (:func:`packmask.pack_lengths`); each row keeps its samples in dataset order. Feed the rows to
    :class:`MultimodalCollator` (a feature may be a list of samples: one row).

    >>> rows = pack_samples([{"input_ids": torch.zeros(1, n, dtype=torch.long)} for n in (5, 3, 6, 2)], 8)
    >>> [[s["input_ids"].shape[1] for s in row] for row in rows]
    [[6, 2], [5, 3]]
    """
    from ..data.packing import pack_lengths

    lengths = [_length(s, i) for i, s in enumerate(samples)]
    assignment = pack_lengths(lengths, max_length, strategy=strategy, overflow="error")
    offsets = assignment.row_offsets.tolist()
    return [[samples[i] for i in sorted(assignment.doc_index[a:b].tolist())] for a, b in zip(offsets, offsets[1:])]


class MultimodalCollator:
    """Collate vision-language samples into packed rows that ``model`` runs exactly per sample.

    Args:
        model: the ``*ForConditionalGeneration`` to train, built with ``attn_implementation="packmask"``
            (its family's rule: :mod:`packmask.multimodal.families`; others raise
            :class:`~packmask.UnsupportedModelError`).
        max_length: tokens per row: the samples of a call fill rows in order, a new row starting when
            the next sample does not fit (a sample is never split). None: one row for the whole call.
        pad_token_id: written into row padding (default: the model's, else 0).
        pad_to_multiple_of: round the row length up, for static shapes.
    """

    def __init__(self, model, max_length: int | None = None, *, pad_token_id: int | None = None,
                 pad_to_multiple_of: int | None = None):
        if not uses_packmask(model):
            raise PackmaskError(
                f"{type(model).__name__} runs attn_implementation={model.config._attn_implementation!r}: packed rows "
                f"need 'packmask' (from_pretrained(..., attn_implementation='packmask') or packmask.enable(model)).")
        if max_length is not None and (isinstance(max_length, bool) or int(max_length) != max_length or max_length < 1):
            raise PackmaskError(f"max_length must be a positive integer (tokens per row), got {max_length!r}.")
        self.family = family_of(model)
        self.model_type = model.config.model_type
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        text = model.config.get_text_config()
        self.pad_token_id = pad_token_id if pad_token_id is not None else (getattr(text, "pad_token_id", None) or 0)
        self._rope_index = rope_index_function(model) if self.family.positions == "mrope" else None
        # a language model that reads no text row gets the 3 mRoPE rows and a [B, N, N] mask instead
        self._text_row = self._rope_index is None or takes_text_row(model)

    # ---- rows -----------------------------------------------------------------------------
    def rows(self, features: Sequence[Any]) -> list[list[dict]]:
        """The rows a call packs: in order, split at ``max_length`` between samples; a list of samples
        (a row from :func:`pack_samples`) is one row as given."""
        rows, current, used = [], [], 0
        for i, feature in enumerate(features):
            if isinstance(feature, (list, tuple)):
                rows += [current] if current else []
                rows.append(list(feature))
                current, used = [], 0
                continue
            n = _length(feature, i)
            if self.max_length is not None and n > self.max_length:
                raise PackmaskError(f"sample {i} has {n} tokens, more than max_length={self.max_length}: a sample is "
                                    f"never split (its images would be cut); drop it or raise max_length.")
            if current and self.max_length is not None and used + n > self.max_length:
                rows.append(current)
                current, used = [], 0
            current.append(feature)
            used += n
        return rows + ([current] if current else [])

    def __call__(self, features: Sequence[Any]) -> dict:
        rows = self.rows(features)
        if not rows:
            raise PackmaskError("MultimodalCollator got no samples.")
        return self.collate_rows(rows)

    # ---- one sample -----------------------------------------------------------------------
    def _positions(self, sample: dict, n: int) -> torch.Tensor:
        """``[R, 1, n]`` positions of one sample alone (R = 4 text + mRoPE rows, 3, or 1)."""
        text = torch.arange(n).view(1, 1, n) + self.family.first_position
        if self._rope_index is None:
            return text
        ids = sample["input_ids"]
        mrope = call_rope_index(self._rope_index, input_ids=ids, mm_token_type_ids=sample.get("mm_token_type_ids"),
                                image_grid_thw=sample.get("image_grid_thw"),
                                video_grid_thw=sample.get("video_grid_thw"),
                                second_per_grid_ts=sample.get("second_per_grid_ts"),
                                attention_mask=torch.ones_like(ids))
        mrope = mrope.to(torch.long).cpu()
        return torch.cat([text, mrope]) if self._text_row else mrope

    def _check(self, sample: dict, index: int) -> int:
        n = _length(sample, index)
        mask = sample.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.bool().all()):
            raise PackmaskError(f"sample {index}: attention_mask has padding; give each sample unpadded (processor "
                                f"called on one sample, padding=False).")
        for key in TOKEN_KEYS:
            t = sample.get(key)
            if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (1, n)):
                raise PackmaskError(f"sample {index}: {key} must be a [1, {n}] tensor like input_ids, got "
                                    f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}.")
        return n

    # ---- rows -> batch --------------------------------------------------------------------
    def collate_rows(self, rows: Sequence[Sequence[dict]]) -> dict:
        """The batch of these rows (each a list of sample dicts, packed in the given order)."""
        samples = [s for row in rows for s in row]
        index = iter(range(len(samples)))
        lengths = [[self._check(s, next(index)) for s in row] for row in rows]
        N = max(sum(r) for r in lengths)
        if self.pad_to_multiple_of:
            N = -(-N // self.pad_to_multiple_of) * self.pad_to_multiple_of
        starts = segments.starts_from_lengths(lengths, N)
        present = {k for s in samples for k in s if k in TOKEN_KEYS}
        with_labels = "labels" in present
        if with_labels and not all("labels" in s for s in samples):
            raise PackmaskError("some samples have labels and some do not: give labels with every sample or none.")
        batch = {}
        pads = dict(input_ids=self.pad_token_id, labels=-100, token_type_ids=0, mm_token_type_ids=0)
        for key in present:
            filled = torch.full((len(rows), N), pads[key], dtype=next(s[key] for s in samples if key in s).dtype)
            for b, row in enumerate(rows):  # a sample without type ids (text only, Idefics3) is all text: 0
                filled[b, :sum(lengths[b])] = torch.cat([s[key][0].cpu() if key in s else
                                                         torch.zeros(n, dtype=filled.dtype)
                                                         for s, n in zip(row, lengths[b])])
            batch[key] = filled
        if with_labels:  # logits[t] predict labels[t + 1]: no sample learns to predict the next one's first token
            batch["labels"] = batch["labels"].masked_fill(starts, -100)
        positions = []
        for b, row in enumerate(rows):
            parts = [self._positions(s, n) for s, n in zip(row, lengths[b])]
            pad = N - sum(lengths[b])
            if pad:  # the padding is a sample of its own (positions 0, 1, ...): the padding rule of segments
                parts.append(torch.arange(pad).view(1, 1, pad).expand(parts[0].shape[0], 1, pad))
            positions.append(torch.cat(parts, dim=2))
        position_ids = torch.cat(positions, dim=1)
        batch["position_ids"] = position_ids[0] if position_ids.shape[0] == 1 else position_ids
        types = batch.get("token_type_ids", batch.get("mm_token_type_ids"))
        if self.family.attention != "causal":
            batch["attention_mask"] = sample_mask(starts, types, self.family.attention)
        elif not self._text_row:  # 3 mRoPE rows only: the samples cannot be read from positions
            batch["attention_mask"] = sample_mask(starts, None, "causal")
        device = samples[0]["input_ids"].device  # token-level tensors follow the samples (built on the host)
        batch = {k: v.to(device) for k, v in batch.items()}
        batch.update(self.vision_inputs(rows))
        batch["use_cache"] = False
        return batch

    def vision_inputs(self, rows: Sequence[Sequence[dict]]) -> dict:
        """The vision inputs of these rows (every tensor of a sample that is not a per-token key),
        concatenated in reading order as the model scatters them into its image tokens."""
        keys = []
        for s in (s for row in rows for s in row):
            keys += [k for k, v in s.items() if k not in TOKEN_KEYS and k != "attention_mask" and k not in keys
                     and isinstance(v, torch.Tensor)]
        out = {}
        dim = self.family.image_dim
        for key in keys:
            if dim == 0:  # every image of the batch, row after row, in reading order
                parts = [s[key] for row in rows for s in row if s.get(key) is not None]
                out[key] = pad_cat(parts, 0)
            else:  # [rows, images, ...]: a row's images on dim 1; rows padded with blank images (dropped by the model)
                per_row = [pad_cat([s[key] for s in row if s.get(key) is not None], 1)
                           if any(s.get(key) is not None for s in row) else None for row in rows]
                ref = next(t for t in per_row if t is not None)
                per_row = [t if t is not None else ref[:, :0] for t in per_row]
                out[key] = pad_cat(per_row, 0)
        return out
