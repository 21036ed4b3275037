"""Attention kernels behind one dispatcher.

Every backend is a module here with a ``NAME``, a ``refusal(layout, spec, q, training)`` that says
why it cannot run a call exactly (None when it can), and a ``run(q, k, v, layout, spec, training)``.
Backends take ``q [B, H, N, D]``, ``k, v [B, Hkv, N, D]`` (transformers' layout) and return
``[B, N, H, D]`` (what transformers' attention functions return).

================  ==================  =========================================================
backend           where               honours
================  ==================  =========================================================
``cudnn``         SM90+, fp16/bf16,   block-diagonal layouts, causal or not, GQA, scale, causal
                  ``packmask[cudnn]`` sliding windows, head dim <= 128. Not: softcap, dropout,
                                      sinks, general masks (cuDNN SDPA with ragged offsets).
``tree_triton``   CUDA + triton       tree layouts only, in one launch per direction (our Triton kernel,
                                      backends/tree_triton.py): GQA, scale, softcap, sliding windows,
                                      fp32/fp16/bf16, forward and backward. Not: dropout, sinks.
                                      Opt-in until measured on a GPU (``auto`` skips it until then).
``varlen``        CUDA, fp16/bf16     block-diagonal layouts, causal or not; tree layouts (shared
                                      prefixes, draft trees over a KV cache) and pieces layouts
                                      (context parallelism) as pieces with gathered keys
                                      (decomposed by backends/tree.py); GQA, scale, sliding windows.
                                      Not: softcap, dropout, sinks, general masks.
``flex``          CUDA                any layout but pieces (BlockMask; trees' from their segments), GQA,
                                      scale, sliding windows, softcap (score_mod). Not: dropout, sinks.
``sdpa``          anywhere            any layout via a dense bool mask, GQA, scale, windows,
                                      dropout. Not: softcap, sinks.
``eager``         anywhere            everything, sinks included (math, softmax in fp32).
================  ==================  =========================================================

Automatic dispatch collects the backends that honour the call; among the document kernels
(cudnn / varlen / flex) it takes the cheapest by the GPU model's measured cost table
(:mod:`packmask.backends.costs`, ``python -m packmask.backends.calibrate``), otherwise the first in
that order. :func:`describe_choice` says what was chosen and why. A feature is never dropped:
forcing a backend that lacks it raises :class:`~packmask.errors.PackmaskError`.

Forcing a backend is scoped, never a hidden process default::

    with packmask.backend("flex"):        # this block, this thread / task
        model(**batch)
    packmask.enable(model, backend="sdpa")  # this model's layers

>>> from packmask.backends import AttentionSpec, choose_backend
>>> from packmask.layout import DocumentLayout
>>> layout = DocumentLayout.from_seq_lengths([[3, 3]], seq_len=6)
>>> q = torch.zeros(1, 2, 6, 8)
>>> choose_backend(layout, AttentionSpec(scale=1.0), q, training=False)      # CPU
'sdpa'
>>> choose_backend(layout, AttentionSpec(scale=1.0, softcap=30.0), q, training=False)
'eager'
>>> with backend("sdpa"):
...     choose_backend(layout, AttentionSpec(scale=1.0, softcap=30.0), q, training=False)
Traceback (most recent call last):
...
packmask.errors.PackmaskError: backend 'sdpa' cannot run this layer: sdpa cannot apply logit softcapping. ...
"""
from __future__ import annotations

import contextlib
import contextvars
import warnings

import torch

from ..errors import PackmaskError
from ..layout import Layout
from . import costs, cudnn, decode, eager, flex, sdpa, varlen
from . import tree_triton  # tree-kernel: the one-launch tree kernel (imports triton lazily)
from .spec import AttentionSpec

# The dispatcher's API. Kernels are imported from their modules (packmask.backends.varlen, .flex, ...).
__all__ = ["AttentionSpec", "BACKENDS", "backend", "requested_backend", "choose_backend", "attend",
           "available_backends", "describe_choice", "check_backend_name", "refresh_traced_request", "backend_module", "current_request"]

# Every backend that can be asked for, fastest first (cudnn is listed even when its optional extra is
# missing: forcing it then says how to install it; available_backends() lists what runs here).
# tree-kernel: tree_triton first for trees, but auto takes it only where calibrate measured it (backends.costs)
_MODULES = {m.NAME: m for m in (cudnn, tree_triton, varlen, flex, sdpa, eager)}
BACKENDS = ("auto",) + tuple(_MODULES)

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("packmask_backend", default=None)


def check_backend_name(name: str) -> str:
    """``name`` if it is one of :data:`BACKENDS`, else a :class:`PackmaskError` listing them."""
    if name not in BACKENDS:
        raise PackmaskError(f"unknown backend {name!r}; choose one of {BACKENDS}.")
    return name


@contextlib.contextmanager
def backend(name: str):
    """Force one backend (``"auto"`` = dispatch) for packmask attention calls inside this block.

    Scoped to the current thread / asyncio task (a ``contextvars`` variable); nested blocks restore
    the outer choice on exit.
    """
    token = _forced.set(check_backend_name(name))
    refresh_traced_request()
    try:
        yield
    finally:
        _forced.reset(token)
        refresh_traced_request()


def current_request() -> str | None:
    """The backend a ``backend(...)`` block asks for here, None outside one (no model setting, no replay).

    >>> current_request() is None
    True
    >>> with backend("eager"):
    ...     current_request()
    'eager'
    """
    return _forced.get()


# torch.compile cannot trace ContextVar.get: compiled layers read this mirror instead, which backend()
# and the model's forward pre-hook refresh eagerly before every compiled forward (dynamo guards on it, so
# a different ``backend(...)`` block recompiles rather than running a stale choice).
_traced_request: dict = {"name": None}


def refresh_traced_request() -> None:
    _traced_request["name"] = _forced.get()


def requested_backend(module=None, layout=None) -> str:
    """The backend asked for: a ``backend(...)`` block, else the model's own setting
    (``packmask.enable(model, backend=...)``), else ``"auto"``.

    A ``backend(...)`` block is remembered on the forward's ``layout``: activation checkpointing
    recomputes layers during backward — on CUDA in autograd's own thread, outside the block — and
    the recomputation must run the kernel the forward ran (torch.utils.checkpoint checks it saves
    the same tensors).
    """
    compiling = torch.compiler.is_compiling()
    name = _traced_request["name"] if compiling else _forced.get()
    memo = None if compiling else getattr(layout, "_memo", None)
    if memo is not None:
        # inside a backward pass (a checkpointed layer being recomputed): replay the forward's request;
        # in a forward: record it (or clear a previous forward's), so a reused input never replays a stale one
        if torch._C._current_graph_task_id() != -1:
            if name is None and "requested_backend" in memo:
                return memo["requested_backend"]
        elif name is not None:
            memo["requested_backend"] = name
        else:
            memo.pop("requested_backend", None)
    if name is not None:
        return name
    per_model = getattr(module, "_packmask_backend", None)
    if per_model is not None:
        return per_model
    return "auto"


def available_backends(device=None) -> tuple[str, ...]:
    """The backends that can run on this machine (``cudnn`` only with ``packmask[cudnn]`` on SM90+)."""
    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    names = []
    for name in _MODULES:
        if name == "cudnn" and not cudnn.available(device if device is not None else ("cuda" if cuda else "cpu")):
            continue
        if name in ("varlen", "flex", "tree_triton") and not cuda:  # tree-kernel: tree_triton too
            continue
        if name == "varlen" and not varlen.varlen_available():
            continue
        if name == "tree_triton" and not tree_triton.triton_available():  # tree-kernel:
            continue
        names.append(name)
    return tuple(names)


def backend_module(name: str):
    """The module of backend ``name`` (its ``refusal`` and ``run``), for calibration and benchmarks."""
    check_backend_name(name)
    return _MODULES[name]


def _candidates(layout, spec, q, training) -> tuple[list[str], dict]:
    """Backends that honour this call (in dispatch order) and why the others refuse it."""
    ok, refused = [], {}
    for name, module in _MODULES.items():
        if name == "flex" and spec.softcap is not None and flex.softcap_compile_failure:
            refused[name] = "flex failed to compile softcapping on this torch"
            continue
        why = module.refusal(layout, spec, q, training)
        if why is None:
            ok.append(name)
        else:
            refused[name] = why
    return ok, refused


def _layers(module) -> int:
    """How many attention layers share one forward's layout (spreads once-per-forward setup costs)."""
    config = getattr(module, "config", None)
    return int(getattr(config, "num_hidden_layers", 1) or 1)


def choose_backend(layout: Layout | None, spec: AttentionSpec, q: torch.Tensor, training: bool,
                   requested: str | None = None, layers: int = 1) -> str:
    """The backend ``attend`` will use for these inputs (a forced backend is validated here)."""
    requested = requested or requested_backend()
    if layout is None:  # nothing packed in this batch: the ordinary path, whatever backend is forced
        return "eager" if spec.softcap is not None or spec.sinks is not None else "sdpa"
    if requested != "auto":
        why = _MODULES[requested].refusal(layout, spec, q, training)
        if why:
            raise PackmaskError(f"backend {requested!r} cannot run this layer: {why}. Use packmask.backend('auto') "
                                f"or leave the choice to the dispatcher.")
        return requested
    ok, _ = _candidates(layout, spec, q, training)
    if not ok:
        return "eager"
    return costs.choose_kernel(ok, layout, q, layers)[0]


def describe_choice(layout: Layout | None, spec: AttentionSpec, q: torch.Tensor, training: bool = True,
                    module=None) -> dict:
    """What the dispatcher would run for this call and why (for ``packmask bench`` and debugging).

    >>> from packmask.layout import DocumentLayout
    >>> layout = DocumentLayout.from_seq_lengths([[3, 3]], seq_len=6)
    >>> info = describe_choice(layout, AttentionSpec(scale=1.0), torch.zeros(1, 2, 6, 8))
    >>> info["backend"], info["candidates"]
    ('sdpa', ['sdpa', 'eager'])
    >>> sorted(info["refused"])
    ['cudnn', 'flex', 'tree_triton', 'varlen']
    """
    requested = requested_backend(module)
    info = {"requested": requested, "backend": None, "candidates": [], "refused": {}}
    if layout is None:
        info["backend"] = choose_backend(layout, spec, q, training, requested)
        info["reason"] = "not packed: the ordinary path"
        return info
    ok, refused = _candidates(layout, spec, q, training)
    info.update(candidates=ok, refused=refused)
    if requested != "auto":
        info["backend"] = choose_backend(layout, spec, q, training, requested)
        info["reason"] = "forced"
        return info
    name, detail = costs.choose_kernel(ok, layout, q, _layers(module)) if ok else ("eager", {})
    info.update(backend=name, **detail)
    return info


def _chosen(layout, spec, q, training, requested, layers) -> str:
    """:func:`choose_backend`, remembered on the forward's layout: every layer of a forward asks the same
    question (same layout, features, shapes), so only the first pays for the refusals and the pricing."""
    memo = getattr(layout, "_memo", None)
    if memo is None or spec.sinks is not None or torch.compiler.is_compiling():
        return choose_backend(layout, spec, q, training, requested, layers)
    key = ("backend", requested, layers, training, spec.dropout > 0, spec.softcap is not None, spec.sliding_window,
           spec.is_causal, q.device, q.dtype, tuple(q.shape[1:]), len(flex.softcap_compile_failure))
    if key not in memo:
        memo[key] = choose_backend(layout, spec, q, training, requested, layers)
    return memo[key]


def attend(q, k, v, layout: Layout | None, spec: AttentionSpec, *, training: bool = False,
           standard_mask: torch.Tensor | None = None, module=None, source_mask: torch.Tensor | None = None,
           route: dict | None = None) -> torch.Tensor:
    """Run attention for one layer. ``layout`` None means the ordinary (unpacked) path, where
    ``standard_mask`` is transformers' own 4D bool mask (or None for plain causal). ``source_mask``: the
    caller's own mask the layout was analysed from (a decode call on sdpa runs it as is:
    :mod:`packmask.backends.decode`); ``route`` (a dict) receives the mask and spec such a call ran with."""
    requested = requested_backend(module, layout)
    name = _chosen(layout, spec, q, training, requested, _layers(module))
    if layout is None:
        run = eager.eager_attention if name == "eager" else sdpa.sdpa_attention
        return run(q, k, v, standard_mask, spec, training)
    if name == "sdpa" and costs.is_decode_layout(layout) and not spec.bidirectional_window:
        mask = decode.decode_mask(layout, source_mask, k.shape[2], spec.sliding_window).to(q.device)
        mask = decode.additive_mask(layout, mask, q.dtype, k.shape[2], spec.sliding_window)  # once per forward
        native_gqa = decode.gqa_in_place(q, k, v, mask)
        if route is not None:
            route["decode_sdpa"] = (mask, spec, native_gqa)
        return decode.decode_sdpa_attention(q, k, v, mask, spec, training, module, native_gqa)
    if name == "flex" and spec.softcap is not None and requested == "auto":
        try:
            return flex.run(q, k, v, layout, spec, training)
        except Exception as e:  # noqa: BLE001 — compiler failure: fall back to exact math, say so once
            flex.softcap_compile_failure.append(repr(e)[:300])
            warnings.warn(f"packmask: flex attention with logit softcapping failed to compile on this torch "
                          f"({type(e).__name__}); using the eager backend (exact, O(N²) memory) instead.")
            name = "eager"
    return _MODULES[name].run(q, k, v, layout, spec, training)
