"""Tree layouts on the fast kernels: a decomposition onto varlen, and flex with a tree BlockMask.

**Varlen decomposition.** Every segment of a :class:`~packmask.layout_tree.TreeLayout` becomes one
varlen "sequence": its queries (contiguous in the flattened batch, so never gathered) attend to
the visible cache, then its ancestor segments, then itself — keys gathered by index, causal and
bottom-right aligned (``cu_seqlens_q != cu_seqlens_k``). The gathered keys of a segment are exactly
the root-to-segment path, in position order, so a sliding window is the kernel's own window. The
backward of ``index_select`` sums the gradients of a key gathered by several segments back into it.

Worked example — prompt ``p`` (3 tokens), chosen ``c`` (2), rejected ``r`` (2) in one row::

    segment   queries (flat)   keys (flat index)        cu_seqlens_q  cu_seqlens_k
    p         0 1 2            0 1 2                    0             0
    c         3 4              0 1 2 3 4                3             3
    r         5 6              0 1 2 5 6                5             8
                                                        7             13

>>> from packmask.masks import tree_mask_from_segments
>>> from packmask.layout import analyse_mask
>>> mask, _ = tree_mask_from_segments([[(0, 3, -1), (3, 2, 0), (5, 2, 0)]], seq_len=7)
>>> p = tree_pieces(analyse_mask(mask))
>>> p.cu_seqlens_q.tolist(), p.cu_seqlens_k.tolist(), p.key_index.tolist()
([0, 3, 5, 7], [0, 3, 8, 13], [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 5, 6])

The entry point :func:`varlen_pieces_attention` takes explicit ``(cu_seqlens_q, cu_seqlens_k,
key_index)`` so other kernels (cuDNN) and context parallelism can reuse the same decomposition.

**Flex.** :func:`tree_block_mask` builds the BlockMask straight from the segments in
O(N · key blocks) (never an N×K mask): a tile is *full* when every query of the block sees every
key of it (a key block inside the cache or a strict ancestor segment of all the block's queries),
*partial* when some pair may see each other; only partial tiles evaluate ``mask_mod``
(:meth:`TreeLayout.visible`, O(1) per pair).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout_tree import TreeLayout
from ..segments import cu_seqlens_from_lengths, span_indices
from .varlen import _gqa_native_varlen, _varlen_params, varlen_flat

__all__ = ["TreePieces", "tree_pieces", "varlen_pieces_attention", "tree_varlen_attention", "tree_block_mask",
           "tree_flex_attention"]

FLEX_BLOCK = 128


@dataclass(frozen=True)
class TreePieces:
    """Varlen decomposition of a tree layout for a layer with ``kv_len`` keys per row.

    ``cu_seqlens_q`` over the flattened ``B * N`` queries; ``key_index`` into the flattened
    ``B * kv_len`` keys, one run per piece, delimited by ``cu_seqlens_k``.
    """

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    key_index: torch.Tensor
    max_q: int
    max_k: int


def _intervals(layout: TreeLayout, kv_len: int | None, include_own: bool):
    """Per segment, the key-column intervals it sees, in path order: ``(lo, hi)`` ``[S, D + 2]`` in
    frame columns of its row (cache first, then ancestors root-first, then itself if ``include_own``)."""
    offset, kv = layout.frame(kv_len)
    seg = layout.segments()
    N, past = layout.seq_len, layout.past
    S, D1 = seg["ancestors"].shape
    anc = seg["ancestors"]
    local_start = seg["start"] - seg["row"] * N
    a = anc.clamp(min=0)
    lo_anc = past + local_start[a] - offset
    hi_anc = lo_anc + seg["length"][a]
    valid = anc >= 0
    if not include_own:
        valid = valid & (torch.arange(D1, device=anc.device)[None] < seg["depth"][:, None])
    lo_anc = torch.where(valid, lo_anc, torch.zeros_like(lo_anc))
    hi_anc = torch.where(valid, hi_anc, torch.zeros_like(hi_anc))
    cache_lo = (layout.cache_start[seg["row"]] - offset).clamp(min=0)
    cache_hi = torch.full_like(cache_lo, past - offset).clamp(min=0)
    cache_hi = torch.maximum(cache_hi, cache_lo)
    lo = torch.cat([cache_lo[:, None], lo_anc], 1)
    hi = torch.cat([cache_hi[:, None], hi_anc], 1)
    return lo, hi, kv


def tree_pieces(layout: TreeLayout, kv_len: int | None = None) -> TreePieces:
    """The varlen decomposition of ``layout`` (cached on it per ``kv_len``; one host sync)."""
    key = ("pieces", kv_len)
    if key in layout._memo:
        return layout._memo[key]
    seg = layout.segments()
    lo, hi, kv = _intervals(layout, kv_len, include_own=True)
    row_base = (seg["row"] * kv)[:, None]
    key_index = span_indices((lo + row_base).reshape(-1), (hi - lo).reshape(-1))
    per_piece = (hi - lo).sum(1)
    cu_k = cu_seqlens_from_lengths(per_piece)
    B, N = layout.batch_size, layout.seq_len
    cu_q = torch.cat([seg["start"], seg["start"].new_tensor([B * N])]).to(torch.int32)
    pieces = TreePieces(cu_q, cu_k, key_index, int(seg["length"].max()), int(per_piece.max()))
    layout._memo[key] = pieces
    return pieces


def varlen_pieces_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, key_index, max_q: int, max_k: int, *,
                            scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Causal (bottom-right aligned) varlen attention of pieces with gathered keys.

    ``q`` ``[B, H, N, D]``, ``k``/``v`` ``[B, Hkv, kv_len, D]`` (transformers' layout); the queries of
    piece ``i`` are flat rows ``cu_seqlens_q[i]:cu_seqlens_q[i+1]``, its keys the flat key rows
    ``key_index[cu_seqlens_k[i]:cu_seqlens_k[i+1]]``. Returns ``[B, N, H, D]``.
    """
    B, H, N, D = q.shape
    qf = q.transpose(1, 2).reshape(B * N, H, D)
    kf = k.transpose(1, 2).reshape(-1, k.shape[1], D).index_select(0, key_index)
    vf = v.transpose(1, 2).reshape(-1, v.shape[1], D).index_select(0, key_index)
    left = sliding_window - 1 if sliding_window is not None else -1
    out = varlen_flat(qf, kf, vf, cu_seqlens_q.to(q.device), cu_seqlens_k.to(q.device), max_q, max_k, scale=scale,
                      window_size=(left, 0))
    return out.view(B, N, H, D)


def tree_varlen_attention(q, k, v, layout: TreeLayout, spec) -> torch.Tensor:
    """A tree layout on varlen. Over a long cache without gradients (verification), the cache is read
    once per row and merged by log-sum-exp with the tree part (:func:`_split_cache_attention`);
    otherwise every piece gathers its keys (:func:`tree_pieces`)."""
    if layout.past > 0 and spec.sliding_window is None and not torch.is_grad_enabled() and _lse_available():
        return _split_cache_attention(q, k, v, layout, spec)
    p = tree_pieces(layout, k.shape[2])
    key_index = p.key_index.to(q.device)
    return varlen_pieces_attention(q, k, v, p.cu_seqlens_q, p.cu_seqlens_k, key_index, p.max_q, p.max_k,
                                   scale=spec.scale, sliding_window=spec.sliding_window)


def _lse_available() -> bool:
    """Whether this torch's varlen returns the log-sum-exp (public ``return_aux``, or torch 2.11's op)."""
    if "return_aux" in _varlen_params():
        return True
    return _gqa_native_varlen()  # the schema check of torch 2.11's custom op (returns out, lse, rng)


def _varlen_lse(qf, kf, vf, cu_q, cu_k, max_q, max_k, causal: bool, scale: float):
    """varlen forward returning ``(out [T, H, D], lse [T, H])`` (fp32 lse; no backward needed)."""
    from torch.nn.attention.varlen import varlen_attn
    H, T = qf.shape[1], qf.shape[0]
    right = 0 if causal else -1
    params = _varlen_params()
    if "return_aux" in params:
        from torch.nn.attention.varlen import AuxRequest
        kw = {}
        if kf.shape[1] != H:
            if "enable_gqa" in params:
                kw["enable_gqa"] = True
            else:
                kf = kf.repeat_interleave(H // kf.shape[1], dim=1)
                vf = vf.repeat_interleave(H // vf.shape[1], dim=1)
        out, lse = varlen_attn(qf, kf, vf, cu_q, cu_k, max_q, max_k, scale=scale, window_size=(-1, right),
                               return_aux=AuxRequest(lse=True), **kw)
    else:  # torch 2.11: the custom op forwards un-expanded kv heads to FlashAttention-2
        out, lse, _ = torch.ops.torch_attn._varlen_attn(qf, kf, vf, cu_q, cu_k, max_q, max_k, causal, scale,
                                                        [-1, right])
    lse = lse.reshape(lse.shape[0], lse.shape[1])
    if tuple(lse.shape) == (H, T):
        lse = lse.transpose(0, 1)  # FlashAttention's varlen keeps [H, total_q]
    return out, lse.float()


def _split_cache_attention(q, k, v, layout: TreeLayout, spec) -> torch.Tensor:
    """Every query of a row attends to the row's visible cache (one non-causal piece per row: the
    cache is read once, not once per segment) and, separately, to its tree ancestors (pieces
    without the cache); the two partial softmaxes are merged exactly by their log-sum-exps."""
    B, H, N, D = q.shape
    kv = k.shape[2]
    offset, _ = layout.frame(kv)
    memo_key = ("split", kv)
    if memo_key not in layout._memo:
        lo = (layout.cache_start - offset).clamp(min=0)
        hi = torch.full_like(lo, layout.past - offset).clamp(min=0)
        lengths = (hi - lo).clamp(min=0)
        rows = torch.arange(B, device=lo.device)
        idx = span_indices(rows * kv + lo, lengths)
        cu_k = cu_seqlens_from_lengths(lengths)
        cu_q = (torch.arange(B + 1, device=lo.device) * N).to(torch.int32)
        empty = torch.repeat_interleave(lengths == 0, N)  # rows that see no cache at all
        seg = layout.segments()
        lo_t, hi_t, _ = _intervals(layout, kv, include_own=True)
        lo_t, hi_t = lo_t[:, 1:], hi_t[:, 1:]  # drop the cache interval
        t_idx = span_indices((lo_t + (seg["row"] * kv)[:, None]).reshape(-1), (hi_t - lo_t).reshape(-1))
        per = (hi_t - lo_t).sum(1)
        t_cu_k = cu_seqlens_from_lengths(per)
        t_cu_q = torch.cat([seg["start"], seg["start"].new_tensor([B * N])]).to(torch.int32)
        layout._memo[memo_key] = (idx, cu_q, cu_k, int(lengths.max()), empty, t_idx, t_cu_q, t_cu_k,
                                  int(seg["length"].max()), int(per.max()))
    (idx, cu_q, cu_k, max_k, empty, t_idx, t_cu_q, t_cu_k, t_max_q, t_max_k) = (
        x.to(q.device) if isinstance(x, torch.Tensor) else x for x in layout._memo[memo_key])
    qf = q.transpose(1, 2).reshape(B * N, H, D)
    kflat = k.transpose(1, 2).reshape(B * kv, k.shape[1], D)
    vflat = v.transpose(1, 2).reshape(B * kv, v.shape[1], D)
    out_c, lse_c = _varlen_lse(qf, kflat.index_select(0, idx), vflat.index_select(0, idx), cu_q, cu_k, N,
                               max(max_k, 1), False, spec.scale)
    out_t, lse_t = _varlen_lse(qf, kflat.index_select(0, t_idx), vflat.index_select(0, t_idx), t_cu_q, t_cu_k,
                               t_max_q, t_max_k, True, spec.scale)
    lse_c = lse_c.masked_fill(empty[:, None], float("-inf"))  # a row with no cache: its cache part weighs 0
    out_c = out_c.masked_fill(empty[:, None, None], 0.0)
    lse = torch.logaddexp(lse_c, lse_t)
    out = out_c.float() * (lse_c - lse).exp()[..., None] + out_t.float() * (lse_t - lse).exp()[..., None]
    return out.to(q.dtype).view(B, N, H, D)


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
    """BlockMask of a tree layout for one layer's keys, built from its segments (cached on the layout)."""
    from torch.nn.attention.flex_attention import BlockMask
    key = ("tree_block_mask", kv_len, sliding_window, str(device), block)
    if key in layout._memo:
        return layout._memo[key]
    L = layout.to(device)
    offset, kv = L.frame(kv_len)
    seg = L.segments()
    B, N, past, K = L.batch_size, L.seq_len, L.past, L.key_len
    nqb, nkb = -(-N // block), -(-kv // block)
    lo, hi, _ = _intervals(L, kv_len, include_own=False)
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

    from .flex import block_indices

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


def tree_flex_attention(q, k, v, layout: TreeLayout, spec) -> torch.Tensor:
    """flex attention over the tree BlockMask (the flex backend's call); returns ``[B, N, H, D]``."""
    from .flex import flex_attention_call
    return flex_attention_call(q, k, v, layout, spec)
