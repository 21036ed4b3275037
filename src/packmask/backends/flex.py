"""FlexAttention with a BlockMask: any layout, GQA, scale, sliding windows, softcap (score_mod).

Needs CUDA (flex has no backward on CPU). Not: dropout, sinks. Block-diagonal layouts get their
BlockMask straight from document offsets in O((N/128)²), tree layouts straight from their
segments (:func:`tree_block_mask`, from the intervals of :mod:`packmask.backends.tree`); general
layouts through ``create_block_mask`` over the layout's mask. Every BlockMask packmask builds is here.
"""
from __future__ import annotations

import torch

from ..layout import DocumentLayout, Layout, TreeLayout
from ..layout_pieces import PiecesLayout
from .spec import AttentionSpec
from .tree import tree_intervals

__all__ = ["NAME", "FLEX_BLOCK", "refusal", "run", "flex_attention_call", "flex_block_mask", "document_block_mask",
           "tree_block_mask", "block_indices", "compiled_flex_attention", "softcap_compile_failure"]

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
    if isinstance(layout, PiecesLayout):
        return "flex has no pieces (context-parallel) path"
    if torch.compiler.is_compiling():
        # issue 21: inside torch.compile(model) on an H200 (torch 2.11) flex gave logits 0.59 away from eager,
        # silently. The sort behind that is gone (block_indices: the in-graph BlockMask now equals the eager one
        # on an H200, tests/backends/test_flex_in_graph.py), but on the same H200 (torch 2.11, 2026-12-05)
        # inductor cannot lower flex with that in-graph BlockMask ("convert FlexibleLayout to FixedLayout
        # first"). Compiled layers therefore use the other kernels (sdpa with the dense mask for general
        # layouts), which are exact; the flex-in-graph test says when a torch compiles it
        return "flex inside torch.compile: torch 2.11's inductor cannot lower flex with an in-graph BlockMask"
    if isinstance(layout, TreeLayout):
        # measured on one H100 with torch 2.11 (tests/backends/test_tree_cuda.py, 2026-11-25): inductor finds no
        # kernel config for the tree BlockMask (triton shared memory over the limit), so trees go to
        # varlen or the dense-mask backends instead of failing mid-training
        return "flex tree BlockMasks fail to compile on torch 2.11 (triton shared-memory limit)"
    return None


def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention
    if "fn" not in _compiled:
        # automatic dynamic shapes: the first shape gets a static (fastest) kernel; a new row length
        # triggers one recompile into a dynamic-shape kernel that then serves every length. New
        # layouts of the same shape are new BlockMask tensors, never a recompile.
        _compiled["fn"] = torch.compile(flex_attention)
    return _compiled["fn"]


def block_indices(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, q_blocks, kv_blocks]`` bool tiles -> BlockMask's ``(counts, indices)``, heads dim 1:
    per query block, how many key blocks are set and their indices first (stable order).

    No sort: each key block's slot is its rank among the set (or unset) blocks of its row, a
    permutation written with one scatter. (Inside ``torch.compile`` on CUDA a sort of a small row is
    lowered to a Triton sort network, one more compiled kernel between the mask and the result.)

    >>> counts, idx = block_indices(torch.tensor([[[False, True, False, True]]]))
    >>> counts.tolist(), idx.tolist()      # set blocks 1 and 3 first, then 0 and 2
    ([[[2]]], [[[[1, 3, 0, 2]]]])
    """
    counts = tiles.sum(-1, dtype=torch.int32)
    set_rank = tiles.cumsum(-1, dtype=torch.int32) - 1
    unset_rank = counts[..., None] + (~tiles).cumsum(-1, dtype=torch.int32) - 1
    slot = torch.where(tiles, set_rank, unset_rank).long()
    blocks = torch.arange(tiles.shape[-1], device=tiles.device, dtype=torch.int32).expand(tiles.shape)
    idx = torch.empty(tiles.shape, device=tiles.device, dtype=torch.int32).scatter(-1, slot, blocks)
    return counts[:, None], idx[:, None]


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


def _block_coverage(lo, hi, nkb: int, block: int):
    """``[S, nkb]`` (partial, full): key blocks an interval touches / lies entirely inside."""
    S = lo.shape[0]
    nonempty = hi > lo
    p_lo, p_hi = lo // block, (hi - 1) // block + 1
    f_lo, f_hi = (lo + block - 1) // block, hi // block

    def cover(a, b, ok):
        diff = torch.zeros(S, nkb + 2, dtype=torch.int32, device=lo.device)
        ok = ok & (b > a)
        one = ok.to(torch.int32)
        diff.scatter_add_(1, torch.where(ok, a, 0).clamp(0, nkb + 1)[:, None], one[:, None])
        diff.scatter_add_(1, torch.where(ok, b, 0).clamp(0, nkb + 1)[:, None], -one[:, None])
        return diff.cumsum(1)[:, :nkb] > 0
    return cover(p_lo, p_hi, nonempty), cover(f_lo, f_hi, nonempty)


def tree_block_mask(layout: TreeLayout, kv_len: int | None, sliding_window: int | None, device,
                    block: int = FLEX_BLOCK):
    """BlockMask of a tree layout for one layer's keys, built from its segments in O(N · key blocks)
    (never an N×K mask; cached on the layout). A tile is *full* when every query of the block sees
    every key of it (a key block inside the cache or a strict ancestor segment of all the block's
    queries), *partial* when some pair may see each other; only partial tiles evaluate ``mask_mod``
    (the element-wise form of :meth:`TreeLayout.visible`, O(1) per pair)."""
    from torch.nn.attention.flex_attention import BlockMask
    key = ("tree_block_mask", kv_len, sliding_window, str(device), block)
    if key in layout._memo:
        return layout._memo[key]
    L = layout.to(device)
    offset, kv = L.frame(kv_len)
    seg = L.segments()
    B, N, past, K = L.batch_size, L.seq_len, L.past, L.key_len
    nqb, nkb = -(-N // block), -(-kv // block)
    lo, hi, _ = tree_intervals(L, kv_len, include_own=False)
    part_seg = torch.zeros(lo.shape[0], nkb, dtype=torch.bool, device=device)
    full_seg = torch.zeros_like(part_seg)
    for j in range(lo.shape[1]):  # D + 2 interval columns (tree depth in segments), not tokens
        p, f = _block_coverage(lo[:, j], hi[:, j], nkb, block)
        part_seg |= p
        full_seg |= f
    tok_seg = seg["of_token"]
    own_start = past + (seg["start"] - seg["row"] * N)[tok_seg] - offset  # [B, N] frame column
    own_end = past + torch.arange(N, device=device)[None] - offset        # the token itself
    kb_lo = torch.arange(nkb, device=device) * block
    kb_hi = torch.clamp(kb_lo + block, max=kv) - 1
    complete_k = (kb_hi - kb_lo + 1) == block
    own_part = (kb_lo[None, None] <= own_end[..., None]) & (kb_hi[None, None] >= own_start[..., None])
    own_full = (kb_lo[None, None] >= own_start[..., None]) & (kb_hi[None, None] <= own_end[..., None]) & complete_k
    part = part_seg[tok_seg] | own_part  # [B, N, nkb]
    full = (full_seg[tok_seg] & complete_k) | own_full
    pad = nqb * block - N
    if pad:
        part = torch.cat([part, part.new_zeros(B, pad, nkb)], 1)
        full = torch.cat([full, full.new_zeros(B, pad, nkb)], 1)  # an incomplete query block is never full
    part = part.view(B, nqb, block, nkb).any(2)
    full = full.view(B, nqb, block, nkb).all(2)
    if sliding_window is not None:
        full = torch.zeros_like(full)  # the window cuts into tiles: evaluate them all
    part = part & ~full

    kv_num, kv_idx = block_indices(part)
    full_num, full_idx = block_indices(full)
    of_token, dep, anc = tok_seg, seg["depth"], seg["ancestors"]
    cache_start = L.cache_start
    consts = torch.tensor([offset, past, K, N - 1], device=device)
    qpos = L.position_ids if sliding_window is not None else None
    kpos = L.key_position_ids(kv_len) if sliding_window is not None else None

    def mask_mod(b, h, q_idx, kv_idx_):
        col = kv_idx_ + consts[0]
        t = col - consts[1]
        tc = torch.minimum(t.clamp(min=0), consts[3])
        sq = of_token[b, q_idx]
        sk = of_token[b, tc]
        tree = (anc[sq, dep[sk]] == sk) & (tc <= q_idx) & (col < consts[2])
        cache = (col >= cache_start[b]) & (col < consts[1])
        m = torch.where(t >= 0, tree, cache)
        if qpos is not None:
            m = m & (qpos[b, q_idx] - kpos[b, kv_idx_] < sliding_window)
        return m

    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                  seq_lengths=(N, kv))
    layout._memo[key] = bm
    return bm


def self_attention_kernel_options(q, k) -> dict | None:
    """flex's kernel options for a call: a row attending to itself (queries = keys: training, prefill)
    always takes flex's main kernel. Below 128 queries inductor would otherwise pick its decoding
    kernel, which is built for a few queries over a long cache; on torch 2.11 + H200 its autotuning
    found no valid config for short packed rows (NoValidChoicesError; tiny VLM rows, issue 21's GPU
    run). Cached decoding (few queries, more keys) keeps inductor's choice.

    >>> q = torch.zeros(1, 2, 64, 16)
    >>> self_attention_kernel_options(q, q), self_attention_kernel_options(q[:, :, :1], q)
    ({'FORCE_USE_FLEX_ATTENTION': True}, None)
    """
    return {"FORCE_USE_FLEX_ATTENTION": True} if q.shape[2] == k.shape[2] else None


def _flex_softcap(q, k, v, block_mask, scale, cap, enable_gqa, kernel_options=None):
    from torch.nn.attention.flex_attention import flex_attention

    # score_mod is created inside the compiled region (a closure made outside and passed in
    # trips torch 2.11's flex backward tracing when the mask_mod also captures tensors)
    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                          kernel_options=kernel_options)


def _flex_softcap_fn():
    if "softcap" not in _compiled:
        _compiled["softcap"] = torch.compile(_flex_softcap)
    return _compiled["softcap"]


def flex_attention_call(q, k, v, layout: Layout, spec: AttentionSpec) -> torch.Tensor:
    if isinstance(layout, TreeLayout):  # keys may be a cache's: past + N, a sliding layer's tail, a static buffer
        block_mask = tree_block_mask(layout, k.shape[2], spec.sliding_window, q.device)
    else:
        block_mask = flex_block_mask(layout, spec.sliding_window, q.device, spec.bidirectional_window)
    gqa = k.shape[1] != q.shape[1]
    options = self_attention_kernel_options(q, k)
    if spec.softcap is not None:
        out = _flex_softcap_fn()(q, k, v, block_mask, spec.scale, float(spec.softcap), gqa, options)
    else:
        out = compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=spec.scale, enable_gqa=gqa,
                                        kernel_options=options)
    return out.transpose(1, 2)


def run(q, k, v, layout, spec: AttentionSpec, training: bool) -> torch.Tensor:
    return flex_attention_call(q, k, v, layout, spec)
