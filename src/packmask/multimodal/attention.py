"""The per-sample attention of a packed multimodal row, as one ``[B, N, N]`` bool mask (True = may attend).

Each sample attends only inside itself, with its family's rule (:mod:`packmask.multimodal.families`):

* ``"causal"`` -- every token sees the earlier tokens of its sample;
* ``"image_bidirectional"`` (Gemma 3) -- causal, and the tokens of one image (a run of
  ``token_type_ids == 1``) see each other, the later ones too;
* ``"prefix"`` (PaliGemma) -- causal, and the prefix (image + prompt, ``token_type_ids == 0``) sees
  all of itself.

Worked example: sample ``a`` = text, a 2-token image ``I I``, text; sample ``b`` = 2 text tokens
(Gemma 3's rule; ``1`` = may attend)::

    tokens       a0 I  I  a3 b0 b1
    token types   0 1  1  0  0  0
    starts        1 .  .  .  1  .

              a0 I  I  a3 b0 b1
        a0     1  .  .  .  .  .
        I      1  1  1  .  .  .      <- the first image token sees the second (same image)
        I      1  1  1  .  .  .
        a3     1  1  1  1  .  .
        b0     .  .  .  .  1  .      <- b never sees a
        b1     .  .  .  .  1  1

>>> starts = torch.tensor([[1, 0, 0, 0, 1, 0]], dtype=torch.bool)
>>> types = torch.tensor([[0, 1, 1, 0, 0, 0]])
>>> sample_mask(starts, types, "image_bidirectional")[0].int().tolist()
[[1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 1, 1]]
"""
from __future__ import annotations

import torch

from .. import segments
from ..errors import PackmaskError
from transformers.masking_utils import and_masks, or_masks

from ..masks import causal, materialize, same_document

__all__ = ["sample_mask", "block_ids", "RULES"]

RULES = ("causal", "image_bidirectional", "prefix")


def _same_block(block_ids: torch.Tensor):
    """Query and key in the same block (block id >= 0; -1 = no block)."""
    def fn(b, h, q_idx, kv_idx):
        q = block_ids[b, q_idx]
        return (q >= 0) & (q == block_ids[b, kv_idx])
    return fn


def block_ids(starts: torch.Tensor, token_types: torch.Tensor | None, rule: str) -> torch.Tensor | None:
    """``[B, N]`` id of the bidirectional block of every token (``-1``: none) under ``rule``, blocks
    never crossing a ``starts`` flag; None for ``"causal"`` (no blocks). ``"image_bidirectional"``:
    each run of image tokens (``token_types == 1``); ``"prefix"``: all prefix tokens
    (``token_types == 0``) between two starts, contiguous or not.

    >>> starts = torch.tensor([[1, 0, 0, 0, 1, 0]], dtype=torch.bool)
    >>> block_ids(starts, torch.tensor([[0, 1, 1, 0, 1, 0]]), "image_bidirectional").tolist()
    [[-1, 1, 1, -1, 3, -1]]
    """
    if rule not in RULES:
        raise PackmaskError(f"unknown attention rule {rule!r}; choose from {RULES}.")
    if rule == "causal":
        return None
    if token_types is None:
        raise PackmaskError(f"the {rule!r} rule reads token_type_ids, which the samples lack: pass the "
                            f"processor's token_type_ids with every sample.")
    inside = token_types == (1 if rule == "image_bidirectional" else 0)
    # runs of image (or prefix) tokens, cut at sample starts: one block each
    run_starts = segments.starts_from_ids(inside.long()) | starts
    if rule == "prefix":  # all prefix tokens of a sample form one block, contiguous or not
        run_starts = starts
    return torch.where(inside, segments.doc_ids_from_starts(run_starts, local=True), -1)


def sample_mask(starts: torch.Tensor, token_types: torch.Tensor | None, rule: str) -> torch.Tensor:
    """``[B, N, N]`` mask: each sample (``starts``, the first token of every sample and of the row's
    padding) attends inside itself by ``rule``; ``token_types`` ``[B, N]`` as the family's processor
    writes them (``token_type_ids``)."""
    B, N = starts.shape
    doc = segments.doc_ids_from_starts(starts, local=True)
    blocks = block_ids(starts, token_types, rule)
    fn = causal if blocks is None else or_masks(causal, _same_block(blocks))
    return materialize(and_masks(same_document(doc), fn), B, N, device=starts.device)
