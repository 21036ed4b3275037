"""torch's ``varlen_attn`` (FlashAttention-2 varlen inside) over the flattened batch.

Honours block-diagonal layouts (causal or bidirectional), tree layouts (shared-prefix rows and
draft trees over a KV cache, as the pieces of :mod:`packmask.backends.tree`), pieces layouts
(context parallelism: :class:`~packmask.layout_pieces.PiecesLayout`), GQA without expanding K/V,
scale and sliding windows (one- or two-sided). Needs CUDA and fp16/bf16.
Not: softcap, dropout, sinks, general masks.

Every varlen kernel of packmask is here: :func:`varlen_attention` (documents),
:func:`varlen_pieces_attention` (pieces with gathered keys: trees, context parallelism) and
:func:`tree_varlen_attention` (trees, with a log-sum-exp split of the cache without gradients).
"""
from __future__ import annotations

import inspect
from functools import lru_cache

import torch

from ..layout import DocumentLayout, TreeLayout
from ..layout_pieces import PiecesLayout
from .spec import AttentionSpec
from .tree import cache_split_pieces, tree_pieces

__all__ = ["NAME", "refusal", "run", "varlen_available", "varlen_flat", "varlen_attention", "varlen_pieces_attention",
           "tree_varlen_attention", "window_size", "gqa_native_varlen", "varlen_params", "merge_partial_attention"]

NAME = "varlen"


@lru_cache(maxsize=None)
def varlen_params() -> frozenset:
    from torch.nn.attention.varlen import varlen_attn
    return frozenset(inspect.signature(varlen_attn).parameters)


@lru_cache(maxsize=None)
def varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@lru_cache(maxsize=None)
def gqa_native_varlen() -> bool:
    """True when torch's varlen custom op can be handed fewer kv heads than query heads.

    torch >= 2.13 says so with ``enable_gqa``; on older torch the public wrapper has no flag, but
    the custom op passes the tensors straight to FlashAttention-2, which handles
    ``num_heads % num_heads_kv == 0`` itself (probed on torch 2.11: benchmarks/gqa_varlen_probe.py).
    """
    import torch.nn.attention.varlen  # noqa: F401 — registers torch.ops.torch_attn
    if "enable_gqa" in varlen_params():
        return True
    try:
        schema = torch.ops.torch_attn._varlen_attn.default._schema
    except (AttributeError, RuntimeError):
        return False
    names = [a.name for a in schema.arguments]
    return names[:10] == ["query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "is_causal", "scale",
                          "window_size"]


def refusal(layout, spec: AttentionSpec, q: torch.Tensor, training: bool) -> str | None:
    if not (q.is_cuda and varlen_available()):
        return "varlen needs CUDA and torch.nn.attention.varlen"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return "varlen needs fp16/bf16"
    if not isinstance(layout, (DocumentLayout, TreeLayout, PiecesLayout)):
        return "varlen needs a block-diagonal, tree or pieces layout"
    if spec.softcap is not None or spec.sinks is not None:
        return "varlen cannot apply softcapping or sinks"
    if spec.dropout > 0 and training:
        return "varlen has no dropout"
    if q.shape[-1] > 256:
        return "varlen supports head dims up to 256"
    return None


def _flat(x: torch.Tensor) -> torch.Tensor:
    B, H, N, D = x.shape
    return x.transpose(1, 2).reshape(B * N, H, D)


def window_size(layout: DocumentLayout, spec: AttentionSpec) -> tuple[int, int]:
    """FlashAttention's ``(left, right)`` band (-1 = unbounded) for the layout's documents and the
    layer's window: the same keys as ``layout.dense_mask(window, spec.bidirectional_window)``. The
    window is one-sided for causal layers (a decoder given bidirectional documents still sees every
    later key of its document) and two-sided for bidirectional layers.

    >>> from packmask.layout import DocumentLayout
    >>> docs = DocumentLayout.from_seq_lengths([[4]], 4, causal=False)
    >>> window_size(docs, AttentionSpec(1.0, sliding_window=3, is_causal=True))
    (2, -1)
    >>> window_size(docs, AttentionSpec(1.0, sliding_window=3, is_causal=False))
    (2, 2)
    """
    window = spec.sliding_window
    left = window - 1 if window is not None else -1
    if layout.causal:
        return left, 0
    return left, (window - 1 if spec.bidirectional_window else -1)


def varlen_flat(qf, kf, vf, cu_q, cu_k, max_q: int, max_k: int, *, scale: float, window_size: tuple[int, int],
                native_gqa: bool | None = None) -> torch.Tensor:
    """torch's ``varlen_attn`` on flat ``[T, H, D]`` queries, ``[T_k, Hkv, D]`` keys/values; returns
    ``[T, H, D]``. ``window_size`` is FlashAttention's ``(left, right)`` band (-1 = unbounded, right 0 =
    causal, bottom-right aligned). GQA without expanding K/V wherever torch allows it."""
    from torch.nn.attention.varlen import varlen_attn
    H = qf.shape[1]
    if kf.shape[1] != H:
        if "enable_gqa" in varlen_params():
            return varlen_attn(qf, kf, vf, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size,
                               enable_gqa=True)
        if native_gqa if native_gqa is not None else gqa_native_varlen():
            # torch 2.11: the public wrapper has no enable_gqa; call its custom op, which forwards the
            # un-expanded kv heads to FlashAttention-2 (saves expanding K/V: memory and copies)
            out, _, _ = torch.ops.torch_attn._varlen_attn(qf, kf, vf, cu_q, cu_k, max_q, max_k, window_size[1] == 0,
                                                          scale, list(window_size))
            return out
        kf = kf.repeat_interleave(H // kf.shape[1], dim=1)
        vf = vf.repeat_interleave(H // vf.shape[1], dim=1)
    return varlen_attn(qf, kf, vf, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size)


def varlen_attention(q, k, v, layout: DocumentLayout, spec: AttentionSpec, native_gqa: bool | None = None) -> torch.Tensor:
    """``q [B, H, N, D]``, ``k, v [B, Hkv, N, D]`` over the layout's documents; returns ``[B, N, H, D]``."""
    B, H, N, D = q.shape
    cu = layout.cu_seqlens.to(q.device)
    mx = layout.max_seqlen
    out = varlen_flat(_flat(q), _flat(k), _flat(v), cu, cu, mx, mx, scale=spec.scale,
                      window_size=window_size(layout, spec), native_gqa=native_gqa)
    return out.view(B, N, H, D)


def varlen_pieces_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, key_index, max_q: int, max_k: int, *,
                            scale: float, sliding_window: int | None = None, causal: bool = True) -> torch.Tensor:
    """Varlen attention of pieces with gathered keys, causal (bottom-right aligned) or not.

    Tree layouts (:func:`packmask.backends.tree.tree_pieces`) and context parallelism (each rank's
    queries against the all-gathered keys, :mod:`packmask.distributed.cp_attention`) run on it.

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
                      window_size=(left, 0 if causal else -1))
    return out.view(B, N, H, D)


def tree_varlen_attention(q, k, v, layout: TreeLayout, spec) -> torch.Tensor:
    """A tree layout on varlen. Over a long cache without gradients (verification), the cache is read
    once per row and merged by log-sum-exp with the tree part (:func:`_split_cache_attention`);
    otherwise every piece gathers its keys (:func:`~packmask.backends.tree.tree_pieces`)."""
    if layout.past > 0 and spec.sliding_window is None and not torch.is_grad_enabled() and _lse_available():
        return _split_cache_attention(q, k, v, layout, spec)
    p = tree_pieces(layout, k.shape[2]).to(q.device)
    return varlen_pieces_attention(q, k, v, p.cu_seqlens_q, p.cu_seqlens_k, p.key_index, p.max_q, p.max_k,
                                   scale=spec.scale, sliding_window=spec.sliding_window)


def _lse_available() -> bool:
    """Whether this torch's varlen returns the log-sum-exp (public ``return_aux``, or torch 2.11's op)."""
    if "return_aux" in varlen_params():
        return True
    return gqa_native_varlen()  # the schema check of torch 2.11's custom op (returns out, lse, rng)


def _varlen_lse(qf, kf, vf, cu_q, cu_k, max_q, max_k, causal: bool, scale: float):
    """varlen forward returning ``(out [T, H, D], lse [T, H])`` (fp32 lse; no backward needed)."""
    from torch.nn.attention.varlen import varlen_attn
    H, T = qf.shape[1], qf.shape[0]
    right = 0 if causal else -1
    params = varlen_params()
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


def merge_partial_attention(out_a, lse_a, out_b, lse_b, dtype):
    """Two attentions of the same queries over disjoint key sets, each softmax-normalised, merged exactly
    into the attention over both: weights ``exp(lse_a - lse)`` and ``exp(lse_b - lse)``, ``lse`` their
    log-sum-exp, i.e. ``w = sigmoid(lse_a - lse_b)`` and ``out = out_b + w (out_a - out_b)`` (one sigmoid and
    one lerp, in fp32). ``out [T, H, D]``, ``lse [T, H]``; a part with ``lse = -inf`` weighs 0.

    >>> s = torch.tensor([[[0.5, -1.0, 2.0, 0.0]]])            # one query's scores over 4 keys
    >>> v = torch.arange(4.0).reshape(1, 1, 4, 1)              # the keys' values
    >>> part = lambda cols: ((s[..., cols].softmax(-1)[..., None] * v[..., cols, :]).sum(-2), s[..., cols].logsumexp(-1))
    >>> (oa, la), (ob, lb) = part([0, 1]), part([2, 3])
    >>> whole = (s.softmax(-1)[..., None] * v).sum(-2)
    >>> torch.allclose(merge_partial_attention(oa, la, ob, lb, torch.float32), whole)
    True
    """
    w = torch.sigmoid(lse_a - lse_b)[..., None]
    return torch.lerp(out_b.float(), out_a.float(), w).to(dtype)


def _split_inputs(layout: TreeLayout, kv: int, device):
    """The cache-split pieces on ``device`` with each gather as (row, column) indices into the layer's
    ``[B, kv, Hkv, D]`` keys, and whether some row sees no cache: once per forward (cached on the layout)."""
    key = ("split_inputs", kv, str(device))
    if key not in layout._memo:
        p = cache_split_pieces(layout, kv).to(device)
        layout._memo[key] = (p, (p.cache_key_index // kv, p.cache_key_index % kv),
                             (p.tree.key_index // kv, p.tree.key_index % kv), bool(p.no_cache.any()))
    return layout._memo[key]


def _split_cache_attention(q, k, v, layout: TreeLayout, spec) -> torch.Tensor:
    """Every query of a row attends to the row's visible cache (one non-causal piece per row: the
    cache is read once, not once per segment) and, separately, to its tree ancestors (pieces
    without the cache); the two partial softmaxes are merged exactly by their log-sum-exps.

    Per layer: four gathers straight from the layer's keys and values (no flattened copy of the whole
    cache first), the two varlen calls, and the merge (:func:`merge_partial_attention`)."""
    B, H, N, D = q.shape
    kv = k.shape[2]
    p, cache_at, tree_at, some_row_without_cache = _split_inputs(layout, kv, q.device)
    qf = q.transpose(1, 2).reshape(B * N, H, D)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # [B, kv, Hkv, D] views, gathered from in place
    out_c, lse_c = _varlen_lse(qf, kt[cache_at], vt[cache_at], p.cache_cu_seqlens_q, p.cache_cu_seqlens_k, N,
                               max(p.cache_max_k, 1), False, spec.scale)
    t = p.tree
    out_t, lse_t = _varlen_lse(qf, kt[tree_at], vt[tree_at], t.cu_seqlens_q, t.cu_seqlens_k, t.max_q, t.max_k, True,
                               spec.scale)
    if some_row_without_cache:  # its cache part is empty: it must weigh 0 (whatever the kernel left there)
        lse_c = lse_c.masked_fill(p.no_cache[:, None], float("-inf"))
        out_c = out_c.masked_fill(p.no_cache[:, None, None], 0.0)
    return merge_partial_attention(out_c, lse_c, out_t, lse_t, q.dtype).view(B, N, H, D)


def run(q, k, v, layout, spec: AttentionSpec, training: bool) -> torch.Tensor:
    if isinstance(layout, TreeLayout):
        return tree_varlen_attention(q, k, v, layout, spec)
    if isinstance(layout, PiecesLayout):
        p = layout.pieces.to(q.device)
        return varlen_pieces_attention(q, k, v, p.cu_seqlens_q, p.cu_seqlens_k, p.key_index, p.max_q, p.max_k,
                                       scale=spec.scale, sliding_window=spec.sliding_window, causal=layout.causal)
    return varlen_attention(q, k, v, layout, spec)
