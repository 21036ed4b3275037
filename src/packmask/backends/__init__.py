"""Attention kernels behind one dispatcher.

Every backend takes ``q [B, H, N, D]``, ``k, v [B, Hkv, N, D]`` (transformers' layout) and returns
``[B, N, H, D]`` (what transformers' attention functions return). The dispatcher picks, per layer
call, the fastest backend that honours every feature the layer asks for:

================  ==================  =========================================================
backend           where               honours
================  ==================  =========================================================
``varlen``        CUDA, fp16/bf16     block-diagonal layouts, causal or not, GQA, scale,
                                      sliding window. Not: softcap, dropout, general masks.
``flex``          CUDA                any layout (BlockMask), GQA, scale, sliding window,
                                      softcap (score_mod). Not: dropout.
``sdpa``          anywhere            any layout via a dense bool mask, GQA, scale, dropout.
``eager``         anywhere            everything above including softcap (math in fp32).
================  ==================  =========================================================

A feature a backend lacks is never dropped: the dispatcher falls through to the next backend
that has it; forcing a backend that lacks it raises :class:`~packmask.errors.PackmaskError`.
"""
from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..errors import PackmaskError
from ..layout import DocumentLayout, Layout

__all__ = ["AttentionSpec", "BACKENDS", "set_backend", "get_backend", "choose_backend", "attend"]

BACKENDS = ("auto", "varlen", "flex", "sdpa", "eager")
_state = {"backend": os.environ.get("PACKMASK_BACKEND", "auto")}


def set_backend(name: str) -> None:
    """Force one backend for every packmask attention call (``"auto"`` restores dispatch)."""
    if name not in BACKENDS:
        raise PackmaskError(f"unknown backend {name!r}; choose one of {BACKENDS}.")
    _state["backend"] = name


def get_backend() -> str:
    return _state["backend"]


@dataclass(frozen=True)
class AttentionSpec:
    """What one layer's attention call asks for, besides q/k/v and the layout."""

    scale: float
    dropout: float = 0.0
    softcap: float | None = None
    sliding_window: int | None = None
    is_causal: bool = True  # only used on the standard (unpacked) path


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

def _flat(x: torch.Tensor) -> torch.Tensor:
    B, H, N, D = x.shape
    return x.transpose(1, 2).reshape(B * N, H, D)


@lru_cache(maxsize=None)
def _varlen_params() -> frozenset:
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
def _gqa_native_varlen() -> bool:
    """True when torch's varlen custom op can be handed fewer kv heads than query heads.

    torch >= 2.13 says so with ``enable_gqa``; on older torch the public wrapper has no flag, but
    the custom op passes the tensors straight to FlashAttention-2, which handles
    ``num_heads % num_heads_kv == 0`` itself (probed on torch 2.11: benchmarks/gqa_varlen_probe.py).
    """
    import torch.nn.attention.varlen  # noqa: F401 — registers torch.ops.torch_attn
    if "enable_gqa" in _varlen_params():
        return True
    try:
        schema = torch.ops.torch_attn._varlen_attn.default._schema
    except (AttributeError, RuntimeError):
        return False
    names = [a.name for a in schema.arguments]
    return names[:10] == ["query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "is_causal", "scale",
                          "window_size"]


def varlen_attention(q, k, v, layout: DocumentLayout, spec: AttentionSpec, native_gqa: bool | None = None) -> torch.Tensor:
    """torch's ``varlen_attn`` (FlashAttention-2 inside) over the flattened batch."""
    from torch.nn.attention.varlen import varlen_attn
    B, H, N, D = q.shape
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    left = spec.sliding_window - 1 if spec.sliding_window is not None else -1
    right = 0 if layout.causal else -1
    cu = layout.cu_seqlens.to(q.device)
    mx = layout.max_seqlen
    if kf.shape[1] != H:
        if "enable_gqa" in _varlen_params():
            out = varlen_attn(qf, kf, vf, cu, cu, mx, mx, scale=spec.scale, window_size=(left, right), enable_gqa=True)
            return out.view(B, N, H, D)
        if native_gqa if native_gqa is not None else _gqa_native_varlen():
            # torch 2.11: the public wrapper has no enable_gqa; call its custom op, which forwards the
            # un-expanded kv heads to FlashAttention-2 (saves expanding K/V: memory and copies)
            out, _, _ = torch.ops.torch_attn._varlen_attn(qf, kf, vf, cu, cu, mx, mx, right == 0, spec.scale,
                                                          [left, right])
            return out.view(B, N, H, D)
        kf = kf.repeat_interleave(H // kf.shape[1], dim=1)
        vf = vf.repeat_interleave(H // vf.shape[1], dim=1)
    out = varlen_attn(qf, kf, vf, cu, cu, mx, mx, scale=spec.scale, window_size=(left, right))
    return out.view(B, N, H, D)


_compiled_flex = {}


def _flex_fn():
    from torch.nn.attention.flex_attention import flex_attention
    if "fn" not in _compiled_flex:
        # automatic dynamic shapes: the first shape gets a static (fastest) kernel; a new row length
        # triggers one recompile into a dynamic-shape kernel that then serves every length. New
        # layouts of the same shape are new BlockMask tensors, never a recompile.
        _compiled_flex["fn"] = torch.compile(flex_attention)
    return _compiled_flex["fn"]


FLEX_BLOCK = 128  # flex attention's default sparse block size


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

    def to_indices(m):
        counts = m.sum(-1, dtype=torch.int32)[:, None]
        idx = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)[:, None]
        return counts, idx

    kv_num, kv_idx = to_indices(partial)
    full_num, full_idx = to_indices(full)
    causal = layout.causal

    def mask_mod(b, h, q_idx, kv_idx_):
        m = doc[b, q_idx] == doc[b, kv_idx_]
        return m & (q_idx >= kv_idx_) if causal else m

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(N, N))


def flex_block_mask(layout: Layout, sliding_window: int | None, device):
    """BlockMask for a layout, built once per layout and window (cached on the layout)."""
    from torch.nn.attention.flex_attention import create_block_mask
    key = ("block_mask", sliding_window, str(device))
    memo = layout._memo
    if key in memo:
        return memo[key]
    if isinstance(layout, DocumentLayout) and sliding_window is None:
        memo[key] = document_block_mask(layout, device)
        return memo[key]
    pos = layout.position_ids.to(device)
    if isinstance(layout, DocumentLayout):
        doc = layout.doc_ids.to(device)
        causal = layout.causal

        def mask_mod(b, h, q_idx, kv_idx):
            m = doc[b, q_idx] == doc[b, kv_idx]
            if causal:
                m = m & (q_idx >= kv_idx)
            return m & (pos[b, q_idx] - pos[b, kv_idx] < sliding_window)
    else:
        dense = layout.mask.to(device)

        def mask_mod(b, h, q_idx, kv_idx):
            m = dense[b, q_idx, kv_idx]
            if sliding_window is not None:
                m = m & (pos[b, q_idx] - pos[b, kv_idx] < sliding_window)
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
    if "softcap" not in _compiled_flex:
        _compiled_flex["softcap"] = torch.compile(_flex_softcap)
    return _compiled_flex["softcap"]


def flex_attention_call(q, k, v, layout: Layout, spec: AttentionSpec) -> torch.Tensor:
    block_mask = flex_block_mask(layout, spec.sliding_window, q.device)
    gqa = k.shape[1] != q.shape[1]
    if spec.softcap is not None:
        out = _flex_softcap_fn()(q, k, v, block_mask, spec.scale, float(spec.softcap), gqa)
    else:
        out = _flex_fn()(q, k, v, block_mask=block_mask, scale=spec.scale, enable_gqa=gqa)
    return out.transpose(1, 2)


def sdpa_attention(q, k, v, mask: torch.Tensor | None, spec: AttentionSpec, training: bool) -> torch.Tensor:
    """PyTorch SDPA with a dense bool mask (True = attend) or ``is_causal``."""
    is_causal = mask is None and spec.is_causal and q.shape[2] > 1
    # enable_gqa: the kernels read shared kv heads in place (no expanded copy kept for backward)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                         dropout_p=spec.dropout if training else 0.0, scale=spec.scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)


def eager_attention(q, k, v, mask: torch.Tensor | None, spec: AttentionSpec, training: bool) -> torch.Tensor:
    """Plain math, as transformers' eager path computes it (softmax in fp32, softcap before mask)."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * spec.scale
    if spec.softcap is not None:
        scores = torch.tanh(scores / spec.softcap) * spec.softcap
    if mask is None and spec.is_causal and q.shape[2] > 1:
        Nq, Nk = q.shape[2], k.shape[2]
        mask = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril(Nk - Nq)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if mask is not None:  # a fully masked row (left padding) gives 0, not NaN
        probs = probs.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    probs = F.dropout(probs.to(q.dtype), p=spec.dropout, training=training)
    return torch.matmul(probs, v).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------

def choose_backend(layout: Layout | None, spec: AttentionSpec, q: torch.Tensor, training: bool) -> str:
    """The backend ``attend`` will use for these inputs (forced backends are validated here)."""
    dropout = spec.dropout > 0 and training
    cuda = q.is_cuda
    forced = _state["backend"]
    if layout is None:  # nothing packed in this batch: the ordinary path, whatever backend is forced
        return "eager" if spec.softcap is not None else "sdpa"
    if forced != "auto":
        why = None
        if forced == "varlen" and not (cuda and isinstance(layout, DocumentLayout) and spec.softcap is None
                                       and not dropout and q.dtype in (torch.float16, torch.bfloat16)):
            why = "varlen needs CUDA, fp16/bf16, a block-diagonal layout, no softcap and no dropout"
        elif forced == "flex" and (not cuda or dropout):
            why = "flex needs CUDA and no dropout (flex has no backward on CPU)"
        elif forced == "sdpa" and spec.softcap is not None:
            why = "sdpa cannot apply logit softcapping"
        if why:
            raise PackmaskError(f"backend {forced!r} cannot run this layer: {why}. Use set_backend('auto').")
        return forced
    if cuda and not dropout:
        if (isinstance(layout, DocumentLayout) and spec.softcap is None and varlen_available()
                and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256):
            return "varlen"
        if spec.softcap is None or "flex_softcap_failed" not in _state:
            return "flex"
    return "eager" if spec.softcap is not None else "sdpa"


def attend(q, k, v, layout: Layout | None, spec: AttentionSpec, *, training: bool = False,
           standard_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Run attention for one layer. ``layout`` None means the ordinary (unpacked) path, where
    ``standard_mask`` is transformers' own 4D bool mask (or None for plain causal)."""
    backend = choose_backend(layout, spec, q, training)
    if backend == "varlen":
        return varlen_attention(q, k, v, layout, spec)
    if backend == "flex":
        if spec.softcap is None or _state["backend"] == "flex":
            return flex_attention_call(q, k, v, layout, spec)
        try:
            return flex_attention_call(q, k, v, layout, spec)
        except Exception as e:  # noqa: BLE001 — compiler failure: fall back to exact math, say so once
            _state["flex_softcap_failed"] = repr(e)[:300]
            warnings.warn(f"packmask: flex attention with logit softcapping failed to compile on this torch "
                          f"({type(e).__name__}); using the eager backend (exact, O(N²) memory) instead.")
            backend = "eager"
    mask = standard_mask if layout is None else layout.dense_mask(spec.sliding_window, kv_len=k.shape[2]).to(q.device)
    if backend == "sdpa":
        return sdpa_attention(q, k, v, mask, spec, training)
    return eager_attention(q, k, v, mask, spec, training)
