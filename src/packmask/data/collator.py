"""``PackedCollator``: batches of packed rows (or plain examples) for ``Trainer`` / ``SFTTrainer``.

Worked example -- two packed rows, ``seq_lengths`` ``[[3, 2], [4]]``, ``pad_to_multiple_of=6``::

    row 0   input_ids     a0 a1 a2 b0 b1 P        (P = pad_token_id)
            labels        -100 a1 a2 -100 b1 -100
            position_ids  0  1  2  0  1  0
    row 1   input_ids     c0 c1 c2 c3 P  P
            labels        -100 c1 c2 c3 -100 -100
            position_ids  0  1  2  3  0  1

    cu_seq_lens_q = cu_seq_lens_k = [0, 3, 5, 6, 10, 12]   (over the 12 flattened tokens;
                                                            each row's padding is its own segment)
    max_length_q = max_length_k = 4

Why the label at the *first* token of every sequence is ``-100``: causal-LM losses in transformers shift
inside the loss (``logits[t]`` is scored against ``labels[t + 1]``), so ``labels[start of b]`` is what the
last token of ``a`` would be trained to predict -- a prediction across the boundary. Running ``b``
alone, its first label is never predicted either, so masking it changes nothing else. This is exactly
what ``transformers.DataCollatorWithFlattening`` does with its ``separator_id=-100``.

With ``flatten=True`` every row is concatenated into one row ``[1, total]`` (the
``DataCollatorWithFlattening`` layout); with ``return_mask=True`` a bool ``attention_mask`` ``[B, N, N]``
(block-diagonal causal, ``packmask.block_diagonal_mask(seq_lengths)``: the row padding is one causal block of
its own, the padding rule of :mod:`packmask.segments`, so no query row is empty) is added.

Use with the HF ``Trainer``: the ``seq_lengths`` column is not a model argument, so the Trainer's default
``remove_unused_columns=True`` deletes it before collation, and a packed row would then look like one
long sequence. Either keep it (``TrainingArguments(remove_unused_columns=False)``, or a Trainer with
:class:`packmask.distributed.PackedTrainerMixin`, which keeps ``seq_lengths`` itself), and say
``PackedCollator`` (``packed=True`` by default) raises with that fix on an example without
``seq_lengths`` instead of training across document boundaries. Plain examples (one sequence each,
padding-free like ``DataCollatorWithFlattening``) take ``PackedCollator(packed=False)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .. import segments
from ..errors import PackmaskError
from ..masks import block_diagonal_mask

__all__ = ["PackedCollator"]

_MASK_KEYS = ("completion_mask", "assistant_masks")
MISSING_SEQ_LENGTHS_FIX = ("the HF Trainer drops that column by default: set "
                           "TrainingArguments(remove_unused_columns=False), or mix "
                           "packmask.distributed.PackedTrainerMixin into the Trainer (it keeps the column)")


def _as_list(value) -> list:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    return list(value)


@dataclass
class PackedCollator:
    """Collate packed rows (examples with ``seq_lengths``) or plain examples (one sequence each).

    Args:
        pad_token_id: id written into padding positions of ``input_ids``.
        pad_to_multiple_of: round the row length (or, with ``flatten``, the total) up to a multiple
            of this, for static shapes.
        max_length: pad every row to exactly this many tokens (raises if a row is longer).
        flatten: one ``[1, total]`` row instead of ``[B, N]`` rows.
        return_mask: also return ``attention_mask`` bool ``[B, N, N]`` (``[1, T, T]`` when flattened).
        return_seq_lengths: also return ``seq_lengths`` (list of per-row lists, padding segments
            excluded).
        label_pad_token_id: label for padding, sequence starts and masked-out tokens.
        use_completion_mask: if an example has ``completion_mask`` or ``assistant_masks`` (TRL's
            columns), tokens where it is 0 get label ``-100``.
        return_attention_mask: also return a 2D ``attention_mask`` ``[B, N]`` (1 on real tokens, 0 on
            row padding): what TRL's ``SFTTrainer`` sums for its ``num_tokens`` metric (without it, TRL
            counts the row width). Only for a model on ``attn_implementation="packmask"``, which takes
            it with the packed keys and stays exact; stock sdpa / eager / flash attention read a 2D
            mask as plain padding and stop separating the sequences (packmask warns).
        packed: ``True`` (default): every example is a packed row and must carry ``seq_lengths``
            (raises with the fix when it was dropped, e.g. by the Trainer's ``remove_unused_columns``:
            a stripped row would otherwise train as one long sequence, silently); ``False``: every
            example is one sequence (an example with ``seq_lengths`` raises); ``None``: each example
            by whether it has ``seq_lengths`` (a batch mixing both raises), which cannot tell a
            stripped packed row from a long plain example.

    Output keys: ``input_ids``, ``labels``, ``position_ids`` (int64 ``[B, N]``), ``cu_seq_lens_q``,
    ``cu_seq_lens_k`` (int32, over the ``B * N`` flattened tokens, row padding its own segment, so
    ``cu[-1] == B * N``), ``max_length_q``, ``max_length_k`` (Python ints), optionally
    ``attention_mask`` (``[B, N, N]`` with ``return_mask``, ``[B, N]`` with ``return_attention_mask``)
    and ``seq_lengths``.
    """

    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None
    max_length: int | None = None
    flatten: bool = False
    return_mask: bool = False
    return_seq_lengths: bool = False
    label_pad_token_id: int = -100
    use_completion_mask: bool = True
    packed: bool | None = True
    return_attention_mask: bool = False

    def __post_init__(self):
        if self.return_attention_mask and self.return_mask:
            raise PackmaskError("return_mask=True (a [B, N, N] attention_mask) and return_attention_mask=True (a 2D one) "
                                "both name the attention_mask key; choose one.")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise PackmaskError(f"pad_to_multiple_of must be >= 1 or None, got {self.pad_to_multiple_of}.")
        if self.max_length is not None and self.max_length < 1:
            raise PackmaskError(f"max_length must be >= 1 or None, got {self.max_length}.")

    # -- per-example -------------------------------------------------------------------------------
    def _row(self, feature: dict, index: int):
        if "input_ids" not in feature:
            raise PackmaskError(f"Example {index} has no 'input_ids' (keys: {sorted(feature)}); tokenize the dataset "
                             "first, or rename the token column to 'input_ids'.")
        ids = _as_list(feature["input_ids"])
        n = len(ids)
        labels = _as_list(feature["labels"]) if feature.get("labels") is not None else list(ids)
        if len(labels) != n:
            raise PackmaskError(f"Example {index}: labels has {len(labels)} entries but input_ids has {n}.")
        lengths = feature.get("seq_lengths")
        if lengths is None and self.packed and n > 0:
            raise PackmaskError(f"Example {index} has no 'seq_lengths' but PackedCollator(packed=True, the default) expects "
                                f"packed rows; if they are, {MISSING_SEQ_LENGTHS_FIX}; if each example is one sequence, "
                                "pass PackedCollator(packed=False).")
        if lengths is not None and self.packed is False:
            raise PackmaskError(f"Example {index} has 'seq_lengths' (a packed row) but PackedCollator(packed=False) expects "
                                "one sequence per example; pass packed=True or None.")
        lengths = [n] if lengths is None else [int(x) for x in _as_list(lengths)]
        if sum(lengths) != n or any(x < 0 for x in lengths):
            raise PackmaskError(f"Example {index}: seq_lengths {lengths} sum to {sum(lengths)} but the row has {n} tokens; "
                             "seq_lengths must list the length of every sequence in the row (as pack_dataset writes it).")
        lengths = [x for x in lengths if x > 0]
        if self.use_completion_mask:
            for key in _MASK_KEYS:
                if feature.get(key) is not None:
                    keep = _as_list(feature[key])
                    labels = [lab if k else self.label_pad_token_id for lab, k in zip(labels, keep)]
        return ids, labels, lengths

    def _padded_length(self, longest: int) -> int:
        if self.max_length is not None:
            if longest > self.max_length:
                raise PackmaskError(f"A row has {longest} tokens, more than max_length={self.max_length}; pack with "
                                 f"pack_dataset(..., max_length={self.max_length}) or raise max_length.")
            longest = self.max_length
        m = self.pad_to_multiple_of
        return longest if not m else -(-longest // m) * m

    # -- batch -------------------------------------------------------------------------------------
    def __call__(self, features: Sequence[dict[str, Any]], return_tensors: str | None = None) -> dict[str, Any]:
        if return_tensors not in (None, "pt"):
            raise PackmaskError(f"PackedCollator returns torch tensors only, got return_tensors={return_tensors!r}.")
        nonempty = [f for f in features if f.get("input_ids") is not None and len(f["input_ids"]) > 0]
        has_lengths = {f.get("seq_lengths") is not None for f in nonempty}
        if self.packed is None and len(has_lengths) > 1:
            raise PackmaskError("This batch mixes packed rows (with 'seq_lengths') and examples without it; if these are "
                                f"packed rows whose 'seq_lengths' was lost, {MISSING_SEQ_LENGTHS_FIX}.")
        rows = [self._row(f, i) for i, f in enumerate(features)]
        rows = [r for r in rows if len(r[0]) > 0]  # like DataCollatorWithFlattening: empty examples add nothing
        if not rows:
            raise PackmaskError("PackedCollator received a batch where every example is empty.")
        if self.flatten:
            ids = [t for r in rows for t in r[0]]
            labels = [t for r in rows for t in r[1]]
            lengths = [x for r in rows for x in r[2]]
            rows = [(ids, labels, lengths)]
        width = self._padded_length(max(len(r[0]) for r in rows))
        B = len(rows)
        input_ids = torch.full((B, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, width), self.label_pad_token_id, dtype=torch.long)
        for b, (row_ids, row_labels, _) in enumerate(rows):
            input_ids[b, :len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
            labels[b, :len(row_labels)] = torch.tensor(row_labels, dtype=torch.long)
        seq_lengths = [list(r[2]) for r in rows]
        starts = segments.starts_from_lengths(seq_lengths, width)  # row padding: one segment of its own
        cu = segments.cu_seqlens_from_starts(starts)
        longest = segments.max_length(cu)
        labels[starts] = self.label_pad_token_id  # the label a cross-boundary prediction would hit
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": segments.position_ids_from_starts(starts),
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": longest,
            "max_length_k": longest,
        }
        if self.return_mask:
            batch["attention_mask"] = block_diagonal_mask(seq_lengths, width)
        if self.return_attention_mask:  # real tokens 1, row padding 0: TRL's SFTTrainer sums it as num_tokens
            lengths = torch.tensor([sum(row) for row in seq_lengths])
            batch["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
        if self.return_seq_lengths:
            batch["seq_lengths"] = seq_lengths
        return batch
