"""Attention of one context-parallel rank: its queries against the all-gathered keys of the row.

Llama 3's context parallelism: every layer all-gathers K and V over the CP group (the backward
reduce-scatters dK and dV), then each rank attends its own queries to the keys of their
documents. The gathered keys come rank-major (rank 0's tokens, then rank 1's, ...); which key a
query may see is decided from the document and position of both, never from where they sit::

    query (doc d, position p) may attend key (doc e, position s)  iff  d == e and s <= p
                                                                 (and p - s < window)

The rank's call is a :class:`~packmask.layout_pieces.PiecesLayout` run through packmask's one
dispatcher (:func:`packmask.backends.attend`), which picks the kernel as for any layout:

* **varlen** (CUDA, fp16/bf16): the rank's queries cut into *pieces* (runs of consecutive tokens
  of one document); each piece gets its own key range — its document from the start (or from the
  window's reach) up to the piece's last query — gathered by index
  (:func:`packmask.backends.varlen.varlen_pieces_attention`, the kernel tree layouts run on too).
  Query and key lengths differ (``cu_seqlens_q != cu_seqlens_k``) and causality is bottom-right
  aligned, as FlashAttention-2 defines it for ``seqlen_q < seqlen_k``.
* **sdpa / eager** (any device, fp32, softcap, dropout): the ``[B, 1, n, cp * n]`` bool mask.
  O(n * N) memory: for CPU, tests and short rows.

Worked example (rank 0 of the plan in :mod:`packmask.distributed.cp_plan`, document ``a`` of
10 tokens zig-zagged over 2 ranks): rank 0 holds ``a0 a1`` and ``a7 a8 a9``::

    piece   queries (positions)   keys (positions)      causal, bottom-right aligned
    0       a0 a1                 a0 a1                 a1 sees a0 a1
    1       a7 a8 a9              a0 .. a9 (10 keys)    a7 sees a0..a7, a9 sees a0..a9
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..backends import AttentionSpec, attend
from ..errors import PackmaskError, UnsupportedModelError
from ..layout_pieces import KeyPieces, PiecesLayout
from ..segments import (cu_seqlens_from_lengths, cu_seqlens_from_starts, doc_bounds_from_starts,
                        lengths_from_cu_seqlens, span_indices, starts_from_ids, starts_from_position_ids)
from ..support import unsupported_reason

__all__ = ["all_gather_sequence", "ContextParallelLayout", "dense_cp_mask", "varlen_pieces"]


def _gather_flat(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    out = x.new_empty(world * x.numel())
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x.reshape(-1), group=group)
    return out.view((world,) + tuple(x.shape))


class _AllGather(torch.autograd.Function):
    """All-gather along a new leading rank dimension; the backward sums every rank's gradient of
    the gathered tensor and hands each rank its own slot (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_flat(x.contiguous(), group)

    @staticmethod
    def backward(ctx, grad):
        group = ctx.group
        grad = grad.contiguous()
        if dist.get_backend(group) == dist.Backend.NCCL:
            out = grad.new_empty(grad.shape[1:])
            scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
            scatter(out.view(-1), grad.view(-1), group=group)
            return out, None
        # gloo has no reduce-scatter on every torch: all-reduce and keep this rank's slot
        dist.all_reduce(grad, group=group)
        return grad[dist.get_rank(group)].clone(), None


def all_gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """``[cp, *x.shape]``: every rank's ``x`` (differentiable: dx = sum over ranks of their grads)."""
    return _AllGather.apply(x, group)


def dense_cp_mask(q_doc, q_pos, k_doc, k_pos, causal: bool = True, window: int | None = None) -> torch.Tensor:
    """``[B, 1, n, K]`` bool: may query ``i`` attend key ``j`` (documents and positions given per token)."""
    m = q_doc[:, :, None] == k_doc[:, None, :]
    if causal:
        m &= k_pos[:, None, :] <= q_pos[:, :, None]
    if window is not None:
        m &= (q_pos[:, :, None] - k_pos[:, None, :]) < window
    return m[:, None]


def varlen_pieces(index_r: torch.Tensor, index_all: torch.Tensor, doc_ids: torch.Tensor,
                  position_ids: torch.Tensor | None = None, causal: bool = True, window: int | None = None):
    """Query pieces of one rank and the flat gathered-key indices of each piece's key range.

    Args:
        index_r: ``[B, n]`` row positions of this rank's tokens (ascending).
        index_all: ``[cp, B, n]`` row positions of every rank's tokens (the gathered key order).
        doc_ids: ``[B, N]`` document of every token of the full rows.
        position_ids: not needed (documents start where ``doc_ids`` change, whatever position
            their first token has); accepted for compatibility.

    Returns:
        ``(cu_q, cu_k, key_index, max_q, max_k)``: int32 cumulative piece lengths over the flat
        ``B * n`` queries and over the packed keys, the long ``key_index`` into the flat gathered
        keys ``[B * cp * n]`` (batch-major, then rank-major), and the longest piece / key range.

    A piece starts at a new document or where this rank's row positions jump (the restart rule of
    :mod:`packmask.segments`, applied to ``index_r``)::

        index_r   0 1 7 8 9        doc_ids of the row   a a a a a a a a a a
        pieces    0 0 1 1 1        (the jump 1 -> 7 starts piece 1)
    """
    cp, B, n = index_all.shape
    N = doc_ids.shape[1]
    dev = index_r.device
    doc_q = torch.gather(doc_ids, 1, index_r)
    cu_q = cu_seqlens_from_starts(starts_from_ids(doc_q) | starts_from_position_ids(index_r))
    q_len = lengths_from_cu_seqlens(cu_q)
    first = cu_q[:-1].long()  # flat query index of every piece start
    last = first + q_len - 1
    row = first // n
    g_first = index_r.reshape(-1)[first]  # row positions of each piece's first and last query
    g_last = index_r.reshape(-1)[last]
    doc_first, doc_end = doc_bounds_from_starts(starts_from_ids(doc_ids))
    doc_start = doc_first.reshape(-1)[row * N + g_first]  # where the piece's document begins in its row
    if causal:
        k_begin = doc_start if window is None else torch.maximum(doc_start, g_first - (window - 1))
        k_end = g_last + 1
    else:
        if window is not None:
            raise PackmaskError("context parallelism has no bidirectional sliding window; train this model without it.")
        k_begin = doc_start
        k_end = doc_end.reshape(-1)[row * N + g_first]
    k_len = k_end - k_begin
    # slot of every (row, row position) in the flat gathered keys [B, cp * n]
    slot = torch.empty(B, N, dtype=torch.long, device=dev)
    slot.scatter_(1, index_all.permute(1, 0, 2).reshape(B, cp * n),
                  torch.arange(cp * n, device=dev).expand(B, -1).contiguous())
    g = span_indices(k_begin, k_len)  # row position of every packed key
    r = torch.repeat_interleave(row, k_len)
    key_index = r * (cp * n) + slot[r, g]
    return cu_q, cu_seqlens_from_lengths(k_len), key_index, int(q_len.max()), int(k_len.max())


class ContextParallelLayout:
    """The layout one CP rank hands to packmask's attention function (as the ``packmask_layout``
    model keyword, see :data:`packmask.inputs.LAYOUT_KWARG`): it brings its own keys
    (:meth:`keys_and_layout`: the all-gathered keys and the pieces of this rank's queries).

    Built by :meth:`packmask.distributed.context_parallel.ContextParallel.shard`; holds the plan,
    this rank and the CP process group. Everything derived from the plan is computed on first use
    and reused by every layer of the forward (and by a gradient-checkpointing recompute).
    """

    def __init__(self, plan, rank: int, group):
        self.plan, self.rank, self.group = plan, rank, group
        self._memo = {}
        self.batch_size, self.seq_len = plan.batch_size, plan.local_len  # what the rank's model sees

    def _meta(self, device):
        key = ("meta", str(device))
        if key not in self._memo:
            p = self.plan
            idx_all = p.index.to(device)
            doc, pos = p.doc_ids.to(device), p.position_ids.to(device)
            keys = idx_all.permute(1, 0, 2).reshape(p.batch_size, -1)  # gathered order: rank-major per row
            self._memo[key] = (torch.gather(doc, 1, idx_all[self.rank]), torch.gather(pos, 1, idx_all[self.rank]),
                               torch.gather(doc, 1, keys), torch.gather(pos, 1, keys))
        return self._memo[key]

    def dense_mask(self, device, causal: bool, window: int | None) -> torch.Tensor:
        """``[B, 1, n, cp * n]`` bool: this rank's queries against the gathered keys."""
        return self.pieces_layout(device, causal, window).dense_mask(window)

    def pieces(self, device, causal: bool, window: int | None):
        """``(cu_q, cu_k, key_index, max_q, max_k)`` of :func:`varlen_pieces` for this rank."""
        p = self.pieces_layout(device, causal, window).pieces
        return p.cu_seqlens_q, p.cu_seqlens_k, p.key_index, p.max_q, p.max_k

    def pieces_layout(self, device, causal: bool, window: int | None) -> PiecesLayout:
        """This rank's call as a layout for packmask's dispatcher (built once per forward: every layer
        and a gradient-checkpointing recompute reuse it, with the kernel it chose)."""
        key = ("layout", str(device), causal, window)
        if key not in self._memo:
            p = self.plan

            def pieces():
                idx = p.index.to(device)
                return KeyPieces(*varlen_pieces(idx[self.rank], idx, p.doc_ids.to(device), None, causal, window))

            def mask():
                return dense_cp_mask(*self._meta(device), causal=causal, window=window)[:, 0]
            self._memo[key] = PiecesLayout(pieces, mask, self.batch_size, self.seq_len, p.cp * self.seq_len, causal,
                                           window)
        return self._memo[key]

    def check_model(self, model) -> None:
        """Refuse models whose sequence mixing is not all attention (their state would not be sharded)."""
        reason = unsupported_reason(model)
        if reason:
            raise UnsupportedModelError(f"packmask cannot shard this model over context-parallel ranks: {reason} "
                                        f"Train it without context parallelism.")

    def keys_and_layout(self, module, query, key, value, *, spec: AttentionSpec):
        """``(keys, values, layout)`` of this rank's call: ``key/value [B, Hkv, n, D]`` (this rank's tokens)
        all-gathered over the context group to ``[B, Hkv, cp * n, D]``, and the
        :class:`~packmask.layout_pieces.PiecesLayout` of this rank's queries against them. packmask's
        attention function runs the call through the dispatcher like any other."""
        B, H, n, D = query.shape
        if (B, n) != (self.batch_size, self.seq_len):
            raise PackmaskError(
                f"the context-parallel layout is for [{self.batch_size}, {self.seq_len}] local tokens but "
                f"{type(module).__name__} got queries of shape {tuple(query.shape)}: pass the batch returned by "
                f"ContextParallel.shard unchanged, with use_cache=False.")
        causal, window = spec.is_causal, spec.sliding_window
        if window is not None and not causal:
            raise PackmaskError(f"{type(module).__name__} has a bidirectional sliding window; context parallelism has "
                                f"none. Train this model without context parallelism.")
        cp = self.plan.cp
        Hkv = key.shape[1]
        k_all = all_gather_sequence(key, self.group).permute(1, 2, 0, 3, 4).reshape(B, Hkv, cp * n, D)
        v_all = all_gather_sequence(value, self.group).permute(1, 2, 0, 3, 4).reshape(B, Hkv, cp * n, D)
        return k_all, v_all, self.pieces_layout(query.device, causal, window)

    def attend(self, module, query, key, value, *, spec: AttentionSpec, training: bool) -> torch.Tensor:
        """``query [B, H, n, D]``, ``key/value [B, Hkv, n, D]`` (this rank's tokens) -> ``[B, n, H, D]``."""
        k_all, v_all, layout = self.keys_and_layout(module, query, key, value, spec=spec)
        return attend(query, k_all, v_all, layout, spec, training=training, module=module)
