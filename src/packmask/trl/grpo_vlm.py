"""Vision-language GRPO rows as shared-prefix trees: TRL's padded ``[prompt | completion]`` rows and
their vision inputs -> :class:`~packmask.multimodal.tree.MultimodalTreeCollator` examples (the prompt,
its image tokens and its images once, each completion a branch).

TRL's GRPO log-prob pass gets ``B`` rows (left-padded prompts, right-padded completions), the images
of every row concatenated (``num_images`` per row; Qwen's ``pixel_values`` are patch rows,
``image_grid_thw.prod(-1)`` per image) and per-token ``token_type_ids`` / ``mm_token_type_ids`` over
the whole row. :func:`vision_rows` cuts the vision inputs back per row, :func:`completion_groups`
makes one example per run of consecutive rows with the same prompt (tokens, token types, images); a
row whose completion is masked out whole (``mask_truncated_completions``) is no branch, its log-probs
stay 0 as TRL's::

    row 0   pad  p0 <img> I I   c0 c1 pad     num_images 1  ->  example 0: prompt p0 <img> I I, its image,
    row 1   pad  p0 <img> I I   d0 pad pad    num_images 1                 completion_ids [[c0, c1], [d0]]
    row 2   q0   q1 q2   q3 q4  e0 e1 e2      num_images 0  ->  example 1: prompt q0 .. q4, [[e0, e1, e2]]

>>> ids = torch.tensor([[0, 5, 6, 7, 8, 0], [0, 5, 6, 9, 0, 0], [4, 3, 2, 7, 7, 7]])
>>> mask = (ids != 0).long()
>>> groups, rows = completion_groups(ids, mask, 3, [{}, {}, {}], {})
>>> [(g["input_ids"].tolist(), g["completion_ids"]) for g in groups], rows
([([[5, 6]], [[7, 8], [9]]), ([[4, 3, 2]], [[7, 7, 7]])], [0, 1, 2])
>>> mask[1, 3:] = 0                                        # row 1's completion masked out
>>> [g["completion_ids"] for g in completion_groups(ids, mask, 3, [{}, {}, {}], {})[0]]
[[[7, 8]], [[7, 7, 7]]]

Rows that are not of that form -- a completion mask that is not a prefix, an empty prompt, image tokens in a completion (tool images), a vision layout not cut here (tiles,
``image_sizes``, ``pixel_attention_mask``) -- give ``None``: the trainer then runs TRL's own
(unshared) method on them.
"""
from __future__ import annotations

import torch

__all__ = ["VISION_KWARGS", "TOKEN_TYPE_KWARGS", "vision_rows", "completion_groups"]

#: TRL's per-token multimodal arguments (whole rows, like input_ids)
TOKEN_TYPE_KWARGS = ("token_type_ids", "mm_token_type_ids")
#: TRL's multimodal arguments of ``_get_per_token_logps_and_entropies`` (besides the token types)
VISION_KWARGS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
                 "image_sizes", "image_position_ids")
_NOT_CUT = ("pixel_attention_mask", "spatial_shapes", "num_tiles", "image_sizes", "image_position_ids")


def vision_rows(num_rows: int, num_images, pixel_values=None, image_grid_thw=None, **others) -> list[dict] | None:
    """The vision inputs of each of ``num_rows`` rows (``{}`` for a row without images), cut as TRL's own
    chunking cuts them; ``None`` for a layout not cut here.

    >>> rows = vision_rows(3, [1, 0, 2], pixel_values=torch.arange(7.)[:, None],
    ...                    image_grid_thw=torch.tensor([[1, 1, 2], [1, 1, 1], [1, 2, 2]]))
    >>> [{k: tuple(v.shape) for k, v in r.items()} for r in rows]    # patch rows 0-1 | none | 2-6
    [{'pixel_values': (2, 1), 'image_grid_thw': (1, 3)}, {}, {'pixel_values': (5, 1), 'image_grid_thw': (2, 3)}]
    >>> rows[2]["pixel_values"].flatten().tolist()
    [2.0, 3.0, 4.0, 5.0, 6.0]
    """
    if any(others.get(k) is not None for k in _NOT_CUT):
        return None
    if pixel_values is None:
        return [{} for _ in range(num_rows)] if image_grid_thw is None else None
    if num_images is None or len(num_images) != num_rows:
        return None
    image_starts = [0]
    for n in num_images:
        image_starts.append(image_starts[-1] + int(n))
    if image_grid_thw is not None:  # Qwen: patch rows, grid.prod(-1) per image
        patch_starts = [0] + image_grid_thw.prod(-1).cumsum(0).tolist()
        if len(patch_starts) != image_starts[-1] + 1 or patch_starts[-1] != pixel_values.shape[0]:
            return None
        return [{} if a == b else dict(pixel_values=pixel_values[patch_starts[a]:patch_starts[b]],
                                       image_grid_thw=image_grid_thw[a:b])
                for a, b in zip(image_starts[:-1], image_starts[1:])]
    if pixel_values.shape[0] != image_starts[-1]:  # one entry per image (Gemma 3, LLaVA)
        return None
    return [{} if a == b else dict(pixel_values=pixel_values[a:b]) for a, b in zip(image_starts[:-1], image_starts[1:])]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def completion_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int, vision: list[dict],
                      token_types: dict, answer_type: int = 0) -> tuple[list[dict], list[int]] | None:
    """One :class:`~packmask.multimodal.tree.MultimodalTreeCollator` example per run of consecutive rows
    with the same prompt: the prompt unpadded (``[1, p]`` ids and token types) with its row's vision
    inputs, and ``completion_ids``, each row's completion unpadded; and the rows that are branches (the
    examples' completions in turn), rows with an empty completion left out. ``None`` when the rows are
    not of that form (module docstring)."""
    K = logits_to_keep
    mask = attention_mask.bool()
    p_mask, c_mask = mask[:, :-K], mask[:, -K:]
    c_len, p_len = c_mask.sum(1), p_mask.sum(1)
    P = p_mask.shape[1]
    if not torch.equal(c_mask, torch.arange(K, device=mask.device)[None] < c_len[:, None]):
        return None   # completion tokens are not a prefix of the completion block
    if not torch.equal(p_mask, torch.arange(P, device=mask.device)[None] >= (P - p_len)[:, None]):
        return None   # prompt is not left-padded
    if bool((p_len == 0).any()):
        return None
    for t in token_types.values():  # image tokens in a completion (tool images) are not a text branch
        if bool(((t[:, -K:] != answer_type) & c_mask).any()):
            return None
    examples, rows, previous = [], [], None
    for r in range(input_ids.shape[0]):   # one loop per row (the batch), none per token
        if int(c_len[r]) == 0:
            continue
        keep = slice(P - int(p_len[r]), P)
        prompt = dict(vision[r], input_ids=input_ids[r:r + 1, keep])
        prompt.update({k: t[r:r + 1, keep] for k, t in token_types.items()})
        completion = input_ids[r, P:P + int(c_len[r])].tolist()
        if previous is not None and _same(prompt, previous):
            examples[-1]["completion_ids"].append(completion)
        else:
            examples.append(dict(prompt, completion_ids=[completion]))
            previous = prompt
        rows.append(r)
    return examples, rows
