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

Rows that are not of that form -- a completion mask that is not a prefix, an empty prompt, image tokens
in a completion (tool images), a vision layout not cut here (LFM2's ``spatial_shapes``, InternVL's
``num_tiles``, ``image_position_ids``) -- give ``None``: the trainer then runs TRL's own (unshared)
method on them.
"""
from __future__ import annotations

import torch

from ..data.spans import offsets_from_lengths
from .grpo_layout import prompt_completion_lengths

__all__ = ["VISION_KWARGS", "TOKEN_TYPE_KWARGS", "CUT_WITH_PIXELS", "vision_rows", "completion_groups"]

#: TRL's per-token multimodal arguments (whole rows, like input_ids)
TOKEN_TYPE_KWARGS = ("token_type_ids", "mm_token_type_ids")
#: TRL's multimodal arguments of ``_get_per_token_logps_and_entropies`` (besides the token types)
VISION_KWARGS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
                 "image_sizes", "image_position_ids")
#: vision inputs cut beside ``pixel_values``, by the family's ``image_dim``
#: (:class:`~packmask.multimodal.families.VisionFamily`, the dimension
#: :meth:`~packmask.multimodal.MultimodalCollator.vision_inputs` concatenates on): one entry per image
#: (dim 0: LLaVA-NeXT / Mistral 3 ``image_sizes``) or one per row (dim 1: Idefics3 / SmolVLM tiles)
CUT_WITH_PIXELS = {0: ("image_sizes",), 1: ("pixel_attention_mask",)}


def vision_rows(num_rows: int, num_images, pixel_values=None, image_grid_thw=None, *, image_dim: int = 0,
                **others) -> list[dict] | None:
    """The vision inputs of each of ``num_rows`` rows (``{}`` for a row without images), cut as TRL's own
    chunking cuts them; ``None`` for a layout not cut here. ``image_dim``: the family's
    (:class:`~packmask.multimodal.families.VisionFamily`): 0, every tensor has one entry per image (Qwen's
    ``pixel_values``: ``image_grid_thw.prod(-1)`` patch rows per image); 1, ``[rows, images, ...]``, each
    row its own (Idefics3 / SmolVLM tiles, padded with blank images the model drops).

    >>> rows = vision_rows(3, [1, 0, 2], pixel_values=torch.arange(7.)[:, None],
    ...                    image_grid_thw=torch.tensor([[1, 1, 2], [1, 1, 1], [1, 2, 2]]))
    >>> [{k: tuple(v.shape) for k, v in r.items()} for r in rows]    # patch rows 0-1 | none | 2-6
    [{'pixel_values': (2, 1), 'image_grid_thw': (1, 3)}, {}, {'pixel_values': (5, 1), 'image_grid_thw': (2, 3)}]
    >>> rows[2]["pixel_values"].flatten().tolist()
    [2.0, 3.0, 4.0, 5.0, 6.0]
    >>> rows = vision_rows(2, [2, 1], pixel_values=torch.zeros(3, 5, 4), image_sizes=torch.ones(3, 2))
    >>> [{k: tuple(v.shape) for k, v in r.items()} for r in rows]    # LLaVA-NeXT: images 0-1 | 2
    [{'pixel_values': (2, 5, 4), 'image_sizes': (2, 2)}, {'pixel_values': (1, 5, 4), 'image_sizes': (1, 2)}]
    >>> rows = vision_rows(3, [1, 0, 2], pixel_values=torch.zeros(3, 4, 8), image_dim=1,
    ...                    pixel_attention_mask=torch.ones(3, 4, 8))
    >>> [sorted(r) for r in rows], rows[2]["pixel_values"].shape      # Idefics3: row r's tiles
    ([['pixel_attention_mask', 'pixel_values'], [], ['pixel_attention_mask', 'pixel_values']], torch.Size([1, 4, 8]))
    """
    others = {k: v for k, v in others.items() if v is not None}
    if pixel_values is None:
        return [{} for _ in range(num_rows)] if image_grid_thw is None and not others else None
    if set(others) - set(CUT_WITH_PIXELS.get(image_dim, ())) or num_images is None or len(num_images) != num_rows:
        return None
    if image_dim == 1:  # each row its own images (and blank padding images, which the model drops)
        per_row = dict(pixel_values=pixel_values, **others)
        if image_grid_thw is not None or any(t.shape[0] != num_rows for t in per_row.values()):
            return None
        return [{k: t[r:r + 1] for k, t in per_row.items()} if int(n) else {} for r, n in enumerate(num_images)]
    if image_dim != 0:
        return None
    image_starts = offsets_from_lengths([int(n) for n in num_images]).tolist()
    if image_grid_thw is not None:  # Qwen: patch rows, grid.prod(-1) per image
        patch_starts = offsets_from_lengths(image_grid_thw.prod(-1).cpu().numpy()).tolist()
        if others or len(patch_starts) != image_starts[-1] + 1 or patch_starts[-1] != pixel_values.shape[0]:
            return None
        return [{} if a == b else dict(pixel_values=pixel_values[patch_starts[a]:patch_starts[b]],
                                       image_grid_thw=image_grid_thw[a:b])
                for a, b in zip(image_starts[:-1], image_starts[1:])]
    per_image = dict(pixel_values=pixel_values, **others)  # one entry per image (Gemma 3, LLaVA, LLaVA-NeXT, ...)
    if any(t.shape[0] != image_starts[-1] for t in per_image.values()):
        return None
    return [{} if a == b else {k: t[a:b] for k, t in per_image.items()}
            for a, b in zip(image_starts[:-1], image_starts[1:])]


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
    lengths = prompt_completion_lengths(attention_mask, K)
    if lengths is None:
        return None
    p_len, c_len = (a.tolist() for a in lengths)   # host ints: no device sync per row below
    c_mask = attention_mask[:, -K:].bool()
    P = attention_mask.shape[1] - K
    for t in token_types.values():  # image tokens in a completion (tool images) are not a text branch
        if bool(((t[:, -K:] != answer_type) & c_mask).any()):
            return None
    examples, rows, previous = [], [], None
    for r in range(input_ids.shape[0]):   # one loop per row (the batch), none per token
        if c_len[r] == 0:
            continue
        keep = slice(P - p_len[r], P)
        prompt = dict(vision[r], input_ids=input_ids[r:r + 1, keep])
        prompt.update({k: t[r:r + 1, keep] for k, t in token_types.items()})
        completion = input_ids[r, P:P + c_len[r]].tolist()
        if previous is not None and _same(prompt, previous):
            examples[-1]["completion_ids"].append(completion)
        else:
            examples.append(dict(prompt, completion_ids=[completion]))
            previous = prompt
        rows.append(r)
    return examples, rows
