"""FlexAttention with a BlockMask: any layout, GQA, scale, sliding windows, softcap (score_mod).

Needs CUDA (flex has no backward on CPU). Not: dropout, sinks. Block-diagonal layouts get their
BlockMask straight from document offsets in O((N/128)²), tree layouts straight from their
segments (:func:`packmask.backends.tree.tree_block_mask`); general layouts through
``create_block_mask`` over the layout's mask.
"""
from __future__ import annotations

import torch

from ..layout import DocumentLayout, Layout, TreeLayout
from .spec import AttentionSpec

NAME = "flex"
FLEX_BLOCK = 128  # flex attention's default sparse block size

_compiled = {}
# Set when flex with softcapping failed to compile on this torch (gemma2 on torch 2.11): automatic
# dispatch then stops offering flex for softcapped layers instead of failing every call.
softcap_compile_failure: list[str] = []


def refusal(layout, spec: AttentionSpec, q: torch.Tensor, training: bool) -> str | None:
    if not q.is_cuda:
        return "flex needs CUDA (flex has no backward on CPU)"
    if spec.dropout > 0 and training:
        return "flex has no dropout"
    if spec.sinks is not None:
        return "flex cannot add attention-sink logits"
    if isinstance(layout, TreeLayout):
        # measured on one H100 with torch 2.11 (tests/backends/test_tree_cuda.py, 2026-11-25): inductor finds no
        # kernel config for the tree BlockMask (triton shared memory over the limit), so trees go to
        # varlen or the dense-mask backends instead of failing mid-training
        return "flex tree BlockMasks fail to compile on torch 2.11 (triton shared-memory limit)"
    return None


def _flex_fn():
    from torch.nn.attention.flex_attention import flex_attention
    if "fn" not in _compiled:
        # automatic dynamic shapes: the first shape gets a static (fastest) kernel; a new row length
        # triggers one recompile into a dynamic-shape kernel that then serves every length. New
        # layouts of the same shape are new BlockMask tensors, never a recompile.
        _compiled["fn"] = torch.compile(flex_attention)
    return _compiled["fn"]


def block_indices(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, q_blocks, kv_blocks]`` bool tiles -> BlockMask's ``(counts, indices)``, heads dim 1:
    per query block, how many key blocks are set and their indices first (stable order)."""
    counts = tiles.sum(-1, dtype=torch.int32)[:, None]
    idx = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)[:, None]
    return counts, idx


def document_block_mask(layout: DocumentLayout, device, block: int = FLEX_BLOCK):
    """BlockMask of a block-diagonal layout computed from document offsets, O((N/block)²).

    Documents are contiguous, so a ``block x block`` tile is fully visible when its query block
    and key block lie in one document (and, if causal, the key block is strictly earlier), and
    partly visible when their document ranges overlap (key block not later, if causal). Only the
    partly visible tiles evaluate ``mask_mod`` element-wise inside the kernel; no N×N mask is ever
    evaluated on the host or device.
    """
    from torch.nn.attention.flex_attention import BlockMask
    N = layout.seq_len
    doc = layout.doc_ids.to(device)
    nb = (N + block - 1) // block
    first = torch.arange(nb, device=device) * block
    last = torch.clamp(first + block, max=N) - 1
    d_first, d_last = doc[:, first], doc[:, last]  # [B, nb]
    overlap = torch.maximum(d_first[:, :, None], d_first[:, None, :]) <= torch.minimum(d_last[:, :, None], d_last[:, None, :])
    i = torch.arange(nb, device=device)
    complete = (last - first + 1) == block
    same_doc = torch.minimum(d_first[:, :, None], d_first[:, None, :]) == torch.maximum(d_last[:, :, None], d_last[:, None, :])
    full = same_doc & complete[None, :, None] & complete[None, None, :]
    if layout.causal:
        overlap = overlap & (i[:, None] >= i[None, :])
        full = full & (i[:, None] > i[None, :])
    partial = overlap & ~full

    kv_num, kv_idx = block_indices(partial)
    full_num, full_idx = block_indices(full)
    causal = layout.causal

    def mask_mod(b, h, q_idx, kv_idx_):
        m = doc[b, q_idx] == doc[b, kv_idx_]
        return m & (q_idx >= kv_idx_) if causal else m

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(N, N))


def flex_block_mask(layout: Layout, sliding_window: int | None, device, bidirectional_window: bool = False):
    """BlockMask for a layout, built once per layout and window (cached on the layout)."""
    from torch.nn.attention.flex_attention import create_block_mask
    key = ("block_mask", sliding_window, bidirectional_window, str(device))
    memo = layout._memo
    if key in memo:
        return memo[key]
    if isinstance(layout, DocumentLayout) and sliding_window is None:
        memo[key] = document_block_mask(layout, device)
        return memo[key]
    pos = layout.position_ids.to(device)

    def in_window(b, q_idx, kv_idx):
        delta = pos[b, q_idx] - pos[b, kv_idx]
        return (delta.abs() if bidirectional_window else delta) < sliding_window

    if isinstance(layout, DocumentLayout):
        doc = layout.doc_ids.to(device)
        causal = layout.causal

        def mask_mod(b, h, q_idx, kv_idx):
            m = doc[b, q_idx] == doc[b, kv_idx]
            if causal:
                m = m & (q_idx >= kv_idx)
            return m & in_window(b, q_idx, kv_idx)
    else:
        dense = layout.mask.to(device)

        def mask_mod(b, h, q_idx, kv_idx):
            m = dense[b, q_idx, kv_idx]
            if sliding_window is not None:
                m = m & in_window(b, q_idx, kv_idx)
            return m
    B, N = layout.batch_size, layout.seq_len
    memo[key] = create_block_mask(mask_mod, B, None, N, N, device=device)
    return memo[key]


def _flex_softcap(q, k, v, block_mask, scale, cap, enable_gqa):
    from torch.nn.attention.flex_attention import flex_attention

    # score_mod is created inside the compiled region (a closure made outside and passed in
    # trips torch 2.11's flex backward tracing when the mask_mod also captures tensors)
    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def _flex_softcap_fn():
    if "softcap" not in _compiled:
        _compiled["softcap"] = torch.compile(_flex_softcap)
    return _compiled["softcap"]


def flex_attention_call(q, k, v, layout: Layout, spec: AttentionSpec) -> torch.Tensor:
    if isinstance(layout, TreeLayout):  # keys may be a cache's: past + N, a sliding layer's tail, a static buffer
        from .tree import tree_block_mask
        block_mask = tree_block_mask(layout, k.shape[2], spec.sliding_window, q.device)
    else:
        block_mask = flex_block_mask(layout, spec.sliding_window, q.device, spec.bidirectional_window)
    gqa = k.shape[1] != q.shape[1]
    if spec.softcap is not None:
        out = _flex_softcap_fn()(q, k, v, block_mask, spec.scale, float(spec.softcap), gqa)
    else:
        out = _flex_fn()(q, k, v, block_mask=block_mask, scale=spec.scale, enable_gqa=gqa)
    return out.transpose(1, 2)


def run(q, k, v, layout, spec: AttentionSpec, training: bool) -> torch.Tensor:
    return flex_attention_call(q, k, v, layout, spec)
