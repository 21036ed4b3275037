"""cuDNN attention over packed rows: ragged (THD) offsets, forward and backward, one graph per row shape.

Optional: needs ``pip install packmask[cudnn]`` (``nvidia-cudnn-frontend``), CUDA, and an SM90+ GPU.
Without the frontend nothing here is imported at ``import packmask`` time and :func:`available` is
False, so the dispatcher simply never lists this backend.

How packed rows map onto cuDNN's ragged layout. The flattened batch of ``T = B * N`` tokens is one
THD tensor; each document is one cuDNN "sequence" of a batch of ``slots`` sequences, located by a
*ragged offset* (its first element in the THD tensor) and a *sequence length*::

    tokens        a0 a1 a2 b0 b1 | c0 c1 c2 c3 pad      B=2 rows of N=5, T=10
    cu_seqlens    [0, 3, 5, 9, 10]                        4 documents (padding is a document)
    slots = 8     lengths [3, 2, 4, 1, 0, 0, 0, 0]        zero-length slots fill the graph's batch
    offsets (q)   [0, 3, 5, 9, 10, 10, 10, 10, 10] * H * D

Both are built on the GPU from ``cu_seqlens`` (no host sync) and reused by every layer of a forward.
The graph itself depends only on (heads, kv heads, head dim, dtype, row length, slot count, mask
options): one generic graph serves every document split of a row shape, so a new batch never builds
a graph. Slot counts are rounded up to a power of two (>= 8), so a run sees a handful of graphs.

GQA runs natively (K/V keep their ``Hkv`` heads). Sliding windows use cuDNN's diagonal band; logit
softcapping and dropout are refused (cuDNN's score modifiers cannot be combined with the ragged
padding mask), so the dispatcher falls through to another backend for such layers.

The kernels are torch custom ops (``torch.ops.packmask.cudnn_attention`` and its backward), with
fake implementations and registered autograd, so ``torch.compile`` traces them as single nodes.
"""
import os
import weakref
from functools import lru_cache

import torch

__all__ = ["NAME", "available", "frontend_version", "refusal", "run", "cudnn_attention", "set_deterministic",
           "deterministic", "slot_count"]

NAME = "cudnn"

# uids of the graph tensors (fixed: the same pack serves every graph)
_Q, _K, _V, _O, _STATS, _DO, _DQ, _DK, _DV, _LEN_Q, _LEN_KV, _OFF_QO, _OFF_KV, _OFF_STATS = range(1, 15)
_MIN_SLOTS = 8
_MAX_HEAD_DIM = 128  # cuDNN's Hopper SDPA backward covers head dims up to 128
_state = {"deterministic": os.environ.get("PACKMASK_DETERMINISTIC", "0") == "1"}


def set_deterministic(flag: bool = True) -> None:
    """Use cuDNN's deterministic backward (bitwise repeatable dQ, somewhat slower).

    ``torch.use_deterministic_algorithms(True)`` turns it on as well.
    """
    _state["deterministic"] = bool(flag)


def deterministic() -> bool:
    return _state["deterministic"] or torch.are_deterministic_algorithms_enabled()


@lru_cache(maxsize=None)
def _frontend():
    """The ``cudnn`` frontend module, or None when the optional extra is not installed."""
    try:
        import cudnn  # noqa: PLC0415 — optional dependency, imported on first use only
    except (ImportError, OSError):  # not installed, or its libraries cannot be loaded
        return None
    return cudnn


@lru_cache(maxsize=None)
def _device_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def frontend_version() -> str | None:
    """The installed cuDNN frontend's version (None without ``packmask[cudnn]``)."""
    mod = _frontend()
    return getattr(mod, "__version__", None) if mod is not None else None


def available(device=None) -> bool:
    """True when the cudnn backend can run here: CUDA, an SM90+ GPU, and the frontend installed."""
    if device is not None and torch.device(device).type != "cuda":
        return False
    return _available_on(-1 if device is None or torch.device(device).index is None else torch.device(device).index)


@torch.compiler.assume_constant_result
def _available_on(index: int) -> bool:
    # a constant per process: torch.compile evaluates it once while tracing instead of tracing it
    if not torch.cuda.is_available():
        return False
    return _device_ok(torch.cuda.current_device() if index < 0 else index) and _frontend() is not None


def refusal(layout, spec, q: torch.Tensor, training: bool) -> str | None:
    """Why this backend cannot run a layer exactly (None when it can). Never drops a feature."""
    from ..layout import DocumentLayout
    if not isinstance(layout, DocumentLayout):
        return "cudnn needs a block-diagonal (document) layout"
    if getattr(spec, "sinks", None) is not None:
        return "cudnn has no attention sinks"
    if not available(q.device):
        return "cudnn needs an SM90+ GPU and nvidia-cudnn-frontend (pip install packmask[cudnn])"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return "cudnn needs fp16/bf16 inputs"
    D = q.shape[-1]
    if D % 8 or D > _MAX_HEAD_DIM:
        return f"cudnn needs a head dim that is a multiple of 8 and at most {_MAX_HEAD_DIM} (got {D})"
    if spec.softcap is not None:
        return "cudnn cannot combine logit softcapping with ragged documents"
    if spec.dropout > 0 and training:
        return "packmask's cudnn backend runs without dropout"
    if spec.sliding_window is not None and not layout.causal:
        return "cudnn's window is one-sided (causal layers only)"
    return None


def slot_count(num_docs: int) -> int:
    """Graph batch size for ``num_docs`` documents: the next power of two, at least 8.

    >>> [slot_count(n) for n in (1, 8, 9, 100)]
    [8, 8, 16, 128]
    """
    return max(_MIN_SLOTS, 1 << max(0, num_docs - 1).bit_length())


# ---------------------------------------------------------------------------------------------
# Graphs, handles, workspace
# ---------------------------------------------------------------------------------------------

_graphs: dict = {}
_handles: dict = {}
_workspace: dict = {}


def _handle(device: torch.device):
    cudnn = _frontend()
    h = _handles.get(device.index)
    if h is None:
        with torch.cuda.device(device):
            h = _handles[device.index] = cudnn.create_handle()
    cudnn.set_stream(handle=h, stream=torch.cuda.current_stream(device).cuda_stream)
    return h


def _shared_workspace(nbytes: int, device: torch.device) -> torch.Tensor:
    """One workspace per device shared by every graph and layer (kernels run in stream order)."""
    ws = _workspace.get(device.index)
    if ws is None or ws.numel() < nbytes:
        ws = _workspace[device.index] = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
    return ws


def workspace_bytes() -> int:
    return sum(w.numel() for w in _workspace.values())


def _io_type(dtype):
    cudnn = _frontend()
    return cudnn.data_type.BFLOAT16 if dtype == torch.bfloat16 else cudnn.data_type.HALF


def _inputs(g, io, slots, S, H, Hkv, D):
    """q, k, v descriptors with ragged offsets, and the per-slot length / offset columns."""
    cudnn = _frontend()
    i32, i64 = cudnn.data_type.INT32, cudnn.data_type.INT64
    sq, skv = [S * H * D, D, H * D, 1], [S * Hkv * D, D, Hkv * D, 1]

    def column(name, uid, n, dt):
        return g.tensor(name=name, dim=[n, 1, 1, 1], stride=[1, 1, 1, 1], data_type=dt, uid=uid)
    q = g.tensor(name="q", dim=[slots, H, S, D], stride=sq, data_type=io, uid=_Q)
    k = g.tensor(name="k", dim=[slots, Hkv, S, D], stride=skv, data_type=io, uid=_K)
    v = g.tensor(name="v", dim=[slots, Hkv, S, D], stride=skv, data_type=io, uid=_V)
    cols = dict(len_q=column("len_q", _LEN_Q, slots, i32), len_kv=column("len_kv", _LEN_KV, slots, i32),
                off_qo=column("off_qo", _OFF_QO, slots + 1, i64), off_kv=column("off_kv", _OFF_KV, slots + 1, i64),
                off_stats=column("off_stats", _OFF_STATS, slots + 1, i64))
    q.set_ragged_offset(cols["off_qo"])
    k.set_ragged_offset(cols["off_kv"])
    v.set_ragged_offset(cols["off_kv"])
    return q, k, v, cols, sq, skv


def _mask_kwargs(causal: bool, window: int):
    cudnn = _frontend()
    kw = {}
    if causal:
        kw.update(diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT, diagonal_band_right_bound=0)
        if window > 0:
            kw["diagonal_band_left_bound"] = window
    return kw


def _finish(g):
    cudnn = _frontend()
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return g


def _forward_graph(key):
    g = _graphs.get(key)
    if g is not None:
        return g
    cudnn = _frontend()
    _, dtype, slots, S, H, Hkv, D, causal, window, scale, device = key
    io, f32 = _io_type(dtype), cudnn.data_type.FLOAT
    g = cudnn.pygraph(io_data_type=io, intermediate_data_type=f32, compute_data_type=f32, handle=_handle(device))
    q, k, v, c, sq, _ = _inputs(g, io, slots, S, H, Hkv, D)
    o, stats = g.sdpa(name="sdpa", q=q, k=k, v=v, generate_stats=True, attn_scale=scale, use_padding_mask=True,
                      seq_len_q=c["len_q"], seq_len_kv=c["len_kv"], **_mask_kwargs(causal, window))
    o.set_uid(_O).set_output(True).set_dim([slots, H, S, D]).set_stride(sq).set_data_type(io)
    o.set_ragged_offset(c["off_qo"])
    stats.set_uid(_STATS).set_output(True).set_dim([slots, H, S, 1]).set_stride([S * H, 1, H, 1]).set_data_type(f32)
    stats.set_ragged_offset(c["off_stats"])
    _graphs[key] = g = _finish(g)
    return g


def _backward_graph(key):
    g = _graphs.get(key)
    if g is not None:
        return g
    cudnn = _frontend()
    _, dtype, slots, S, H, Hkv, D, causal, window, scale, device, total, determ = key
    io, f32 = _io_type(dtype), cudnn.data_type.FLOAT
    g = cudnn.pygraph(io_data_type=io, intermediate_data_type=f32, compute_data_type=f32, handle=_handle(device))
    q, k, v, c, sq, skv = _inputs(g, io, slots, S, H, Hkv, D)
    o = g.tensor(name="o", dim=[slots, H, S, D], stride=sq, data_type=io, uid=_O)
    do = g.tensor(name="dO", dim=[slots, H, S, D], stride=sq, data_type=io, uid=_DO)
    stats = g.tensor(name="stats", dim=[slots, H, S, 1], stride=[S * H, 1, H, 1], data_type=f32, uid=_STATS)
    o.set_ragged_offset(c["off_qo"])
    do.set_ragged_offset(c["off_qo"])
    stats.set_ragged_offset(c["off_stats"])
    padded_total = (total + 63) // 64 * 64
    dq, dk, dv = g.sdpa_backward(name="sdpa_bwd", q=q, k=k, v=v, o=o, dO=do, stats=stats, attn_scale=scale,
                                 use_padding_mask=True, seq_len_q=c["len_q"], seq_len_kv=c["len_kv"],
                                 max_total_seq_len_q=padded_total, max_total_seq_len_kv=padded_total,
                                 use_deterministic_algorithm=determ, **_mask_kwargs(causal, window))
    for t, uid, stride in ((dq, _DQ, sq), (dk, _DK, skv), (dv, _DV, skv)):
        heads = H if uid == _DQ else Hkv
        t.set_uid(uid).set_output(True).set_dim([slots, heads, S, D]).set_stride(stride).set_data_type(io)
    dq.set_ragged_offset(c["off_qo"])
    dk.set_ragged_offset(c["off_kv"])
    dv.set_ragged_offset(c["off_kv"])
    _graphs[key] = g = _finish(g)
    return g


_metadata: dict = {}


def ragged_metadata(cu_seqlens: torch.Tensor, slots: int, H: int, Hkv: int, D: int) -> dict:
    """Per-slot lengths and ragged offsets (device tensors) from ``cu_seqlens``; no host sync.

    Memoised on the ``cu_seqlens`` tensor object (all layers of a forward share it), checked
    through a weak reference and its version counter, so a recycled address never hits.
    """
    key = (id(cu_seqlens), cu_seqlens._version, slots, H, Hkv, D)
    hit = _metadata.get(key)
    if hit is not None and hit[0]() is cu_seqlens:
        return hit[1]
    n = cu_seqlens.numel() - 1
    cu = cu_seqlens.to(torch.int64)
    if slots > n:  # zero-length slots after the last document
        cu = torch.cat([cu, cu[-1:].expand(slots - n)])
    lengths = (cu[1:] - cu[:-1]).to(torch.int32).view(-1, 1, 1, 1)
    col = cu.view(-1, 1, 1, 1)
    meta = {_LEN_Q: lengths, _LEN_KV: lengths, _OFF_QO: col * (H * D), _OFF_KV: col * (Hkv * D), _OFF_STATS: col * H}
    if len(_metadata) > 32:
        _metadata.clear()
    _metadata[key] = (weakref.ref(cu_seqlens), meta)
    return meta


def _graph_key(q, k, cu, row_len, causal, window, scale):
    T, H, D = q.shape
    slots = slot_count(cu.numel() - 1)
    return ("fwd", q.dtype, slots, row_len, H, k.shape[1], D, causal, window, scale, q.device), slots


# ---------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile; fake implementations give the shapes)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("packmask::cudnn_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, row_len: int,
                  scale: float, causal: bool, window: int, determ: bool) -> tuple[torch.Tensor, torch.Tensor]:
    T, H, D = q.shape
    key, slots = _graph_key(q, k, cu_seqlens, row_len, causal, window, scale)
    g = _forward_graph(key)
    out = torch.empty_like(q)
    stats = torch.empty(T, H, 1, dtype=torch.float32, device=q.device)
    pack = {_Q: q, _K: k, _V: v, _O: out, _STATS: stats,
            **ragged_metadata(cu_seqlens, slots, H, k.shape[1], D)}
    g.execute(pack, _shared_workspace(g.get_workspace_size(), q.device), handle=_handle(q.device))
    return out, stats


@_attention_op.register_fake
def _attention_fake(q, k, v, cu_seqlens, row_len, scale, causal, window, determ):
    T, H, _ = q.shape
    return torch.empty_like(q), q.new_empty((T, H, 1), dtype=torch.float32)


@torch.library.custom_op("packmask::cudnn_attention_backward", mutates_args=())
def _backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 stats: torch.Tensor, cu_seqlens: torch.Tensor, row_len: int, scale: float, causal: bool, window: int,
                 determ: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T, H, D = q.shape
    fkey, slots = _graph_key(q, k, cu_seqlens, row_len, causal, window, scale)
    g = _backward_graph(("bwd",) + fkey[1:] + (T, determ))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    pack = {_Q: q, _K: k, _V: v, _O: out, _DO: dout, _STATS: stats, _DQ: dq, _DK: dk, _DV: dv,
            **ragged_metadata(cu_seqlens, slots, H, k.shape[1], D)}
    g.execute(pack, _shared_workspace(g.get_workspace_size(), q.device), handle=_handle(q.device))
    return dq, dk, dv


@_backward_op.register_fake
def _backward_fake(dout, q, k, v, out, stats, cu_seqlens, row_len, scale, causal, window, determ):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, row_len, scale, causal, window, determ = inputs
    out, stats = output
    ctx.save_for_backward(q, k, v, out, stats, cu_seqlens)
    ctx.params = (row_len, scale, causal, window, determ)


def _backward(ctx, dout, dstats):
    q, k, v, out, stats, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = torch.ops.packmask.cudnn_attention_backward(dout.contiguous(), q, k, v, out, stats, cu_seqlens,
                                                             *ctx.params)
    return dq, dk, dv, None, None, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Backend entry
# ---------------------------------------------------------------------------------------------

def _thd(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, D]`` -> contiguous ``[B * N, H, D]`` (free when x is a transposed [B, N, H, D])."""
    B, H, N, D = x.shape
    return x.transpose(1, 2).reshape(B * N, H, D).contiguous()


def cudnn_attention(q, k, v, layout, spec) -> torch.Tensor:
    """Document attention of ``q [B, H, N, D]``, ``k, v [B, Hkv, N, D]`` -> ``[B, N, H, D]``."""
    B, H, N, D = q.shape
    window = int(spec.sliding_window) if spec.sliding_window is not None else 0
    cu = layout.cu_seqlens
    if cu.device != q.device:
        cu = cu.to(q.device)
    out, _ = torch.ops.packmask.cudnn_attention(_thd(q), _thd(k), _thd(v), cu, N, float(spec.scale),
                                                bool(layout.causal), window, deterministic())
    return out.view(B, N, H, D)


def run(q, k, v, layout, spec, training: bool = False) -> torch.Tensor:
    """The dispatcher's entry (``refusal`` returned None for these inputs)."""
    return cudnn_attention(q, k, v, layout, spec)


def flops(seq_lengths, heads: int, head_dim: int, causal: bool = True) -> float:
    """Forward matmul FLOPs of document attention (x3.5 for forward + backward).

    >>> flops([4, 4], heads=1, head_dim=2)
    128.0
    """
    pairs = sum(x * x for x in seq_lengths) / (2 if causal else 1)
    return 4.0 * pairs * heads * head_dim

