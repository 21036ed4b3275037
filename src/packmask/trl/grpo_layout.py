"""TRL's GRPO batch, read once for both tree builders (text: :func:`packmask.trl.grpo.group_rows`,
vision-language: :func:`packmask.trl.grpo_vlm.completion_groups`).

TRL scores a generation batch as rows of a left-padded prompt followed by a right-padded block of
``logits_to_keep`` completion tokens::

    row 0   pad p0 p1 | c0 c1 pad        prompt 2, completion 2
    row 1   p0 p1 p2  | d0 pad pad       prompt 3, completion 1
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["prompt_completion_lengths"]


def prompt_completion_lengths(attention_mask: torch.Tensor, logits_to_keep: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(prompt lengths, completion lengths)`` of every row (host arrays, one device-to-host copy), or
    None when the rows are not of TRL's form: completion tokens that are not a prefix of their block, a
    prompt that is not left-padded, or an empty prompt (the caller then leaves the batch to TRL).

    >>> mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [0, 1, 1, 0, 1, 0]])
    >>> [a.tolist() for a in prompt_completion_lengths(mask[:2], 3)]
    [[2, 3], [2, 1]]
    >>> prompt_completion_lengths(mask, 3) is None   # row 2: a hole in its completion
    True
    """
    K = logits_to_keep
    mask = attention_mask.detach().cpu().numpy().astype(bool)
    p_mask, c_mask = mask[:, :-K], mask[:, -K:]
    c_len, p_len = c_mask.sum(1), p_mask.sum(1)
    P = p_mask.shape[1]
    if not np.array_equal(c_mask, np.arange(K)[None] < c_len[:, None]):
        return None   # completion tokens are not a prefix of the completion block
    if not np.array_equal(p_mask, np.arange(P)[None] >= (P - p_len)[:, None]):
        return None   # prompt is not left-padded
    if (p_len == 0).any():
        return None
    return p_len, c_len
