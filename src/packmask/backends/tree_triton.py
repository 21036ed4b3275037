"""One-launch tree attention: a Triton kernel where each query row attends to a union of key intervals.

A tree layout (:class:`~packmask.layout_tree.TreeLayout`) is ranked in preorder (depth-first, children
in token order). A token's subtree is then one rank range, so "key ``j`` is an ancestor-or-self of
query ``q``" is ``rank[j] <= rank[q] < rank[j] + subtree_size[j]``: the kernel needs, per key column,
the rank range of the queries that see it, and per query its rank. Rows already in depth-first order
(what :func:`packmask.pack_forest` writes: prompt, then each branch; every tree of
:mod:`packmask.data.agentic`) have ``rank == index``, so each query block visits only the ``<= depth``
key intervals of its path (tiles, like a BlockMask's). Other orders (a breadth-first draft tree) are
exact too, with less tile skipping. The cache (a visible cache column is seen by every query) and a
sliding window (``pos[q] - pos[k] < window``) fold into the same test.

Worked example — prompt ``p`` (3 tokens), chosen ``c`` (2), rejected ``r`` (2) in one row::

    tokens        p0 p1 p2 c0 c1 r0 r1
    rank           0  1  2  3  4  5  6        (depth-first already: rank == index)
    sees [lo, hi)  [0,7) [1,7) [2,7) [3,5) [4,5) [5,7) [6,7)   (queries whose rank is in the range)
    r0 (rank 5) sees p0 p1 p2 (5 in [0,7), [1,7), [2,7)) and itself, not c0 (5 not in [3,5))

>>> from packmask.layout_tree import TreeLayout
>>> layout = TreeLayout.from_parents(torch.tensor([[-1, 0, 1, 2, 3, 2, 5]]))
>>> a = tree_kernel_inputs(layout, block_m=16, block_n=16)
>>> a.qrank.tolist(), a.klo.tolist(), a.khi.tolist()
([[0, 1, 2, 3, 4, 5, 6]], [[0, 1, 2, 3, 4, 5, 6]], [[7, 7, 7, 5, 5, 7, 7]])

Honours: tree layouts (shared-prefix training rows, draft trees over a KV cache, a sliding layer's
cropped cache, a static cache's longer buffer), forward and backward, GQA (kv heads read in place),
scale, logit softcapping, sliding windows, fp32 / fp16 / bf16. Not: dropout, attention sinks,
head dims over 256. Needs triton (CUDA; on CPU only under ``TRITON_INTERPRET=1``, for tests).
"""
from __future__ import annotations

import os
import torch

from ..errors import PackmaskError
from ..layout_tree import TreeLayout
from .spec import AttentionSpec
from .tree_triton_inputs import TreeKernelInputs, tree_kernel_inputs, tree_ranks

NAME = "tree_triton"

__all__ = ["NAME", "TreeKernelInputs", "tree_kernel_inputs", "tree_ranks", "tree_triton_attention", "refusal", "run",
           "triton_available"]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def refusal(layout, spec: AttentionSpec, q: torch.Tensor, training: bool) -> str | None:
    """Why the tree kernel cannot run this call exactly (None: it can)."""
    if not isinstance(layout, TreeLayout):
        return "tree_triton runs tree layouts only"
    if spec.dropout > 0 and training:
        return "tree_triton has no dropout"
    if spec.sinks is not None:
        return "tree_triton cannot add attention-sink logits"
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"tree_triton runs fp32/fp16/bf16, not {q.dtype}"
    if q.shape[-1] > 256:
        return "tree_triton supports head dims up to 256"
    if not (q.is_cuda or _interpreting()):
        return "tree_triton needs CUDA (or TRITON_INTERPRET=1)"
    if not triton_available():
        return "tree_triton needs triton (pip install triton)"
    return None


# ---- launches ----------------------------------------------------------------------------------------
def _config(N: int, D: int, interpreting: bool, dtype=torch.bfloat16):
    """``((block_m, block_n, warps, stages) forward, (...) backward)``; ``PACKMASK_TREE_BLOCKS`` =
    ``"fm,fn,bm,bn"`` overrides the block sizes (for tuning runs). fp32 tiles are halved (twice the
    bytes per element: the same shared memory)."""
    if interpreting:
        return (16, 16, 1, 1), (16, 16, 1, 1)
    override = os.environ.get("PACKMASK_TREE_BLOCKS")
    wide = dtype == torch.float32
    if override:
        fm, fn, bm, bn = (int(x) for x in override.split(","))
    else:
        fm = 64 if N <= 64 or wide else 128
        fn = 64 if D <= 64 or (D <= 128 and not wide) else 32
        bm, bn = (64, 64) if D <= 64 or (D <= 128 and not wide) else (32, 32)
    warps = 4 if D <= 64 else 8
    return (fm, fn, warps, 3 if D <= 128 and not wide else 2), (bm, bn, warps, 2 if D <= 64 or not wide else 1)


def _grid_args(a: TreeKernelInputs):
    return (a.qrank, a.klo, a.khi, a.qpos, a.kpos)


@torch.library.custom_op("packmask::tree_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qrank: torch.Tensor, klo: torch.Tensor,
            khi: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor, q_count: torch.Tensor, q_index: torch.Tensor,
            scale: float, softcap: float, window: int, block_m: int, block_n: int, warps: int,
            stages: int) -> tuple[torch.Tensor, torch.Tensor]:
    from .tree_triton_kernels import tree_fwd_kernel
    B, H, N, D = q.shape
    Hkv, KV = k.shape[1], k.shape[2]
    nqb, nkb = q_index.shape[1], q_index.shape[2]
    splits = _kv_splits(q.device, nqb * B * H, nkb)
    if splits == 1:
        out = torch.empty(B, N, H, D, device=q.device, dtype=q.dtype)
        lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    else:  # partial softmaxes of each share of the keys, merged below by their log-sum-exps
        out = torch.empty(splits, B, N, H, D, device=q.device, dtype=torch.float32)
        lse = torch.empty(splits, B, H, N, device=q.device, dtype=torch.float32)
    o3 = out if splits == 1 else out[0]
    BD = max(16, 1 << (D - 1).bit_length())
    extra = {} if _interpreting() else dict(num_warps=warps, num_stages=stages)
    tree_fwd_kernel[(nqb, B * H, splits)](
        q, k, v, out, lse, qrank, klo, khi, qpos, kpos, q_count, q_index,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o3.stride(0), o3.stride(1), o3.stride(2),
        out.stride(0) if splits > 1 else 0, lse.stride(0) if splits > 1 else 0,
        H, N, KV, D, nqb, nkb, H // Hkv, splits, scale, softcap,
        WINDOW=window, SOFTCAP=softcap > 0, IEEE=q.dtype == torch.float32, BM=block_m, BN=block_n, BD=BD, **extra)
    if splits == 1:
        return out, lse
    total = torch.logsumexp(lse, 0)  # a share with no visible key has lse -inf: weight 0
    weight = torch.nan_to_num((lse - total).exp(), nan=0.0).permute(0, 1, 3, 2)[..., None]  # [S, B, N, H, 1]
    return (out * weight).sum(0).to(q.dtype), total


def _kv_splits(device, programs: int, key_blocks: int) -> int:
    """Split the keys when the grid would leave most SMs idle (a few query blocks over a long cache:
    draft-tree verification); ``PACKMASK_TREE_SPLITS`` forces a count (tests, tuning)."""
    forced = os.environ.get("PACKMASK_TREE_SPLITS")
    if forced:
        return max(1, min(int(forced), key_blocks))
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    want = (2 * sms) // max(programs, 1)
    return max(1, min(want, key_blocks // 4, 16))


_SMS: dict = {}


def _sm_count(index: int) -> int:
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


@_fwd_op.register_fake
def _(q, k, v, qrank, klo, khi, qpos, kpos, q_count, q_index, scale, softcap, window, block_m, block_n, warps, stages):
    B, H, N, D = q.shape
    return q.new_empty(B, N, H, D), q.new_empty(B, H, N, dtype=torch.float32)


@torch.library.custom_op("packmask::tree_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, qrank: torch.Tensor, klo: torch.Tensor, khi: torch.Tensor, qpos: torch.Tensor,
            kpos: torch.Tensor, q_count: torch.Tensor, q_index: torch.Tensor, k_count: torch.Tensor,
            k_index: torch.Tensor, scale: float, softcap: float, window: int, block_m: int, block_n: int,
            warps: int, stages: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .tree_triton_kernels import tree_bwd_dkdv_kernel, tree_bwd_dq_kernel
    B, H, N, D = q.shape
    Hkv, KV = k.shape[1], k.shape[2]
    do = do if do.stride(-1) == 1 else do.contiguous()
    delta = (do.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, N]
    # gradients laid out like their inputs (what the fake kernel declares: empty_like), written by strides
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    dv = torch.empty_like(dk, dtype=v.dtype)  # the kernel writes dk and dv with the same strides
    nqb, nkb = q_index.shape[1], q_index.shape[2]
    BD = max(16, 1 << (D - 1).bit_length())
    G = H // Hkv
    flags = dict(WINDOW=window, SOFTCAP=softcap > 0, IEEE=q.dtype == torch.float32, BM=block_m, BN=block_n, BD=BD)
    if not _interpreting():
        flags.update(num_warps=warps, num_stages=stages)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    tree_bwd_dkdv_kernel[(nkb, B * Hkv)](q, k, v, do, lse, delta, dk, dv, qrank, klo, khi, qpos, kpos,
                                         k_count, k_index, *strides, dk.stride(0), dk.stride(1), dk.stride(2),
                                         H, Hkv, N, KV, D, nqb, nkb, G, scale, softcap, **flags)
    tree_bwd_dq_kernel[(nqb, B * H)](q, k, v, do, lse, delta, dq, qrank, klo, khi, qpos, kpos, q_count, q_index,
                                     *strides, dq.stride(0), dq.stride(1), dq.stride(2),
                                     H, N, KV, D, nqb, nkb, G, scale, softcap, **flags)
    return dq, dk, dv


@_bwd_op.register_fake
def _(do, q, k, v, out, lse, qrank, klo, khi, qpos, kpos, q_count, q_index, k_count, k_index, scale, softcap,
      window, block_m, block_n, warps, stages):
    dk = torch.empty_like(k)
    return torch.empty_like(q), dk, torch.empty_like(dk, dtype=v.dtype)


class _TreeAttention(torch.autograd.Function):
    """Forward on the forward tiles, backward on the backward tiles (block sizes may differ)."""

    @staticmethod
    def forward(ctx, q, k, v, fwd_tensors, bwd_tensors, params):
        scale, softcap, window, fcfg, bcfg = params
        out, lse = _fwd_op(q, k, v, *fwd_tensors, scale, softcap, window, *fcfg)
        ctx.save_for_backward(q, k, v, out, lse, *bwd_tensors)
        ctx.params = (scale, softcap, window, bcfg)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, *bwd = ctx.saved_tensors
        scale, softcap, window, bcfg = ctx.params
        dq, dk, dv = _bwd_op(do, q, k, v, out, lse, *bwd, scale, softcap, window, *bcfg)
        return dq, dk, dv, None, None, None


def tree_triton_attention(q, k, v, layout: TreeLayout, spec: AttentionSpec) -> torch.Tensor:
    """``q [B, H, N, D]``, ``k, v [B, Hkv, kv_len, D]`` over ``layout``; returns ``[B, N, H, D]``."""
    why = refusal(layout, spec, q, training=False)
    if why is not None:
        raise PackmaskError(f"tree_triton_attention: {why}.")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    B, H, N, D = q.shape
    fcfg, bcfg = _config(N, D, _interpreting(), q.dtype)
    window = spec.sliding_window
    fwd = tree_kernel_inputs(layout, k.shape[2], window, fcfg[0], fcfg[1], q.device)
    bwd = fwd if bcfg[:2] == fcfg[:2] else tree_kernel_inputs(layout, k.shape[2], window, bcfg[0], bcfg[1], q.device)
    return tree_attention_from_inputs(q, k, v, fwd, bwd, spec, fcfg, bcfg)


def tree_attention_from_inputs(q, k, v, fwd: TreeKernelInputs, bwd: TreeKernelInputs, spec: AttentionSpec,
                               fcfg, bcfg) -> torch.Tensor:
    """The kernel on prepared inputs (what a compiled region calls: tensors in, no layout object)."""
    fwd_t = (*_grid_args(fwd), fwd.q_count, fwd.q_index)
    bwd_t = (*_grid_args(bwd), bwd.q_count, bwd.q_index, bwd.k_count, bwd.k_index)
    params = (float(spec.scale), float(spec.softcap or 0.0), int(spec.sliding_window or 0), tuple(fcfg), tuple(bcfg))
    return _TreeAttention.apply(q, k, v, fwd_t, bwd_t, params)


def run(q, k, v, layout, spec: AttentionSpec, training: bool) -> torch.Tensor:
    return tree_triton_attention(q, k, v, layout, spec)


# ---- torch.compile of a whole model on tree rows (tree-kernel) ---------------------------------------
#: model keyword through which the forward pre-hook hands compiled layers the kernel's inputs (tensors
#: only: a new tree of the same shape is new tensor values, never a recompile)
TREE_KWARG = "packmask_tree_kernel"


def compiled_model_inputs(model, layout: TreeLayout, device, training: bool):
    """``(forward inputs, backward inputs)`` of a tree layout for every layer of ``model``, or None when a
    layer could need something the prepared inputs do not cover (a cache, sliding windows, sinks,
    dropout while training, no triton / CUDA): those stay on the ordinary path. The caller asks only when
    this kernel was forced (``packmask.backend("tree_triton")``): it is opt-in until measured on a GPU."""
    config = getattr(model, "config", None)
    if config is None or layout.past:
        return None
    if not (torch.device(device).type == "cuda" or _interpreting()) or not triton_available():
        return None
    if getattr(config, "sliding_window", None) or any("sliding" in str(t) for t in getattr(config, "layer_types", ()) or ()):
        return None
    if training and float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0:
        return None
    heads = getattr(config, "num_attention_heads", None)
    D = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    dtype = next(model.parameters()).dtype
    if D is None or D > 256:
        return None
    fcfg, bcfg = _config(layout.seq_len, D, _interpreting(), dtype)
    fwd = tree_kernel_inputs(layout, None, None, fcfg[0], fcfg[1], device)
    bwd = tree_kernel_inputs(layout, None, None, bcfg[0], bcfg[1], device)
    return fwd, bwd


def compiled_layer_attention(q, k, v, prepared, spec: AttentionSpec, training: bool) -> torch.Tensor:
    """A layer's attention from the inputs the pre-hook prepared (:func:`compiled_model_inputs`)."""
    fwd, bwd = prepared
    B, H, N, D = q.shape
    fcfg, bcfg = _config(N, D, _interpreting(), q.dtype)
    if k.shape[2] != N or spec.sliding_window is not None or spec.sinks is not None or \
            (spec.dropout > 0 and training) or (fcfg[0], fcfg[1], bcfg[0], bcfg[1]) != (
                fwd.block_m, fwd.block_n, bwd.block_m, bwd.block_n):
        raise PackmaskError(f"a compiled tree forward prepared the tree kernel for [{N}] keys without windows, "
                            f"sinks or dropout, but this layer needs more ({k.shape[2]} keys, {spec}); run it "
                            f"uncompiled or report the model.")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return tree_attention_from_inputs(q, k, v, fwd, bwd, spec, fcfg, bcfg)
