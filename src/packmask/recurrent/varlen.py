"""The varlen fast path and the dispatcher between it and the generic per-sequence path.

On a packed forward each installed mixer (:class:`MixerForward`, the replacement ``forward`` of one
mixer instance) takes one of two paths:

============  =========================================  =================================================
path          runs                                       honours
============  =========================================  =================================================
``varlen``    the mixer's own forward **once** over the  layers whose token mixing goes through
              packed row; its kernel functions           transformers' per-instance kernel functions
              (``layer._kernel_funcs``) replaced, for    (``chunk_gated_delta_rule``, ``chunk_kda``,
              this call, by varlen kernels given the     ``causal_conv1d_fn``, ``mamba_chunk_scan_combined``:
              layout's boundaries                        :mod:`packmask.recurrent.kernels`); CUDA tensors
              (:mod:`packmask.recurrent.kernels`)        (CPU only with ``configure(cpu_kernels=True)``
                                                         under ``TRITON_INTERPRET=1``), fp32 / fp16 / bf16.
                                                         Not: a cache or recurrent state, a kernel function
                                                         it has no varlen version of, a sequence ``Conv1d``
                                                         called as a module, shared-prefix trees (a branch
                                                         starts from its prompt's state).
``generic``   the mixer once per packed sequence         everything (:mod:`packmask.recurrent.segmented`)
============  =========================================  =================================================

``configure(path="auto")`` (default) takes ``varlen`` where it honours the call, else ``generic``;
``path="generic"`` always per sequence; ``path="varlen"`` raises :class:`~packmask.PackmaskError`
naming the reason and the pip extra where the kernel path cannot run.
:func:`packmask.recurrent.describe_paths` says
which path each mixer of a model would take and why::

    hidden  [a0 a1 a2 b0 b1 | c0 c1 c2 c3 P]        layout cu_seqlens [0, 3, 5, 9, 10]
    varlen  mixer([a0 .. P])  with chunk_gated_delta_rule(..., cu_seqlens=[0, 3, 5, 9, 10])
    generic mixer([a0 a1 a2]) mixer([b0 b1]) mixer([c0 .. c3]) mixer([P])   (grouped, right-padded)

Never silently wrong: a varlen call whose layer did not run its mixing through a replaced kernel
function, or that called a sequence convolution module directly, raises instead of returning.

>>> from packmask.recurrent import describe_paths
>>> from packmask.testing import tiny_model
>>> model = tiny_model("qwen3_5_text")
>>> info = describe_paths(model, device="cpu")
>>> info["model.layers.0.linear_attn"]["path"]          # CPU tensors: the kernels run on CUDA
'generic'
"""
from __future__ import annotations

import threading
import types

import torch

from ..errors import PackmaskError, UnsupportedModelError
from ..layout_tree import TreeLayout
from .context import current_layout
from .detect import is_sequence_conv
from .kernels import (CACHE_ONLY_FUNCTIONS, EXTRAS, ROUTING_FUNCTIONS, VARLEN_FUNCTIONS, Boundaries, CacheOnly,
                      NoFusion, kernel_hooks_available, kernels_available)
from .segmented import CACHE_ARGUMENTS, DROPPED_ARGUMENTS, SegmentedForward
from .settings import SETTINGS

__all__ = ["MixerForward", "kernel_plan", "varlen_refusal", "choose_path"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_plan(module) -> tuple[dict | None, str | None]:
    """``({function name: (package, replacement class)}, None)`` when every kernel function of
    ``module`` has a varlen version (or only serves a cache) and its package imports here, else
    ``(None, why)``.

    >>> plan, why = kernel_plan(torch.nn.Linear(2, 2))   # a layer transformers gives no kernel functions
    >>> plan, why.split(";")[0]
    (None, "transformers gives this layer no per-instance kernel functions (transformers' `kernels` hooks)")

    (Mamba's mixer, on a transformers with per-instance hooks: ``(None, "its kernel function
    'mamba_inner_fn' has no varlen version in packmask")``.)
    """
    if not kernel_hooks_available(module):
        return None, (f"transformers gives this layer no per-instance kernel functions (transformers' `kernels` "
                      f"hooks); {EXTRAS['kernels']}")
    plan, mixing = {}, False
    for name in module.__dict__["_kernel_funcs"]:
        if name in ROUTING_FUNCTIONS:
            continue
        if name in CACHE_ONLY_FUNCTIONS:
            plan[name] = (None, CacheOnly)
            continue
        options = VARLEN_FUNCTIONS.get(name)
        if options is None:
            return None, f"its kernel function {name!r} has no varlen version in packmask"
        chosen = next(((pkg, cls) for pkg, cls in options.items() if pkg is None or kernels_available(pkg)), None)
        if chosen is None:
            needs = " or ".join(EXTRAS[pkg] for pkg in options)
            return None, f"its kernel function {name!r} needs a varlen kernel: {needs}"
        plan[name] = chosen
        mixing = mixing or chosen[1] is not NoFusion
    if not mixing:
        return None, "it has no token-mixing kernel function to give the boundaries to"
    return plan, None


def varlen_refusal(plan_and_why, hidden: torch.Tensor | None = None, *, device=None, dtype=None) -> str | None:
    """Why the varlen path cannot run this call (None when it can): the plan's reason, the device
    (CUDA; CPU only with ``configure(cpu_kernels=True)``) or the dtype."""
    plan, why = plan_and_why
    if plan is None:
        return why
    device = torch.device(device if device is not None else hidden.device)
    dtype = dtype if dtype is not None else hidden.dtype
    if device.type != "cuda" and not SETTINGS["cpu_kernels"]:
        return f"its tensors are on {device.type}; the varlen kernels run on CUDA"
    if dtype not in _DTYPES:
        return f"its hidden states are {dtype}; the varlen kernels take float32 / float16 / bfloat16"
    return None


def choose_path(plan_and_why, hidden: torch.Tensor, where: str = "this layer") -> str:
    """``"varlen"`` or ``"generic"`` for one packed call, by ``configure(path=...)`` (see the module doc)."""
    requested = SETTINGS["path"]
    if requested == "generic":
        return "generic"
    why = varlen_refusal(plan_and_why, hidden)
    if why is None:
        return "varlen"
    if requested == "varlen":
        raise PackmaskError(f"the recurrent path 'varlen' cannot run {where}: {why}. Use "
                            f"packmask.recurrent.configure(path='auto') to fall back to the per-sequence path.")
    return "generic"


@torch.compiler.disable  # a ContextVar read: outside any traced graph
def _layout_now():
    return current_layout()


def _refuse_conv_call(module, args):
    raise PackmaskError(f"packmask's varlen path: the layer called its sequence convolution "
                        f"{type(module).__name__} as a module, which would convolve across packed boundaries; "
                        f"use packmask.recurrent.configure(path='generic') and report the layer to packmask.")


def _bound(replacement, target):
    """``replacement`` as the bound ``forward`` of one kernel-function wrapper (``kernels`` reads
    ``forward.__func__``, as ``kernelize`` sets it)."""
    def forward(_wrapper, *args, **kwargs):
        return replacement(*args, **kwargs)
    return types.MethodType(forward, target)


class MixerForward(SegmentedForward):
    """The replacement ``forward`` of one mixer instance: the varlen path or the generic one."""

    def __init__(self, module: torch.nn.Module, original, name: str):
        super().__init__(module, original, name)
        self.module = module
        self._plan = None
        # the kernel functions are swapped on this instance for one call: two threads running the same model
        # must not see each other's boundaries (or restore each other's functions mid-call)
        self._swap = threading.RLock()

    def plan(self):
        """:func:`kernel_plan` of this mixer, computed on first use (the kernels a process has do not change)."""
        if self._plan is None:
            self._plan = kernel_plan(self.module)
        return self._plan

    def __call__(self, *args, **kwargs):
        layout = _layout_now()
        if layout is None:
            return self.original(*args, **kwargs)
        hidden = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        where = f"the recurrent layer {self.name} ({self.module_class})"
        # a shared-prefix tree is no set of documents: a branch starts from its prompt's state, which the
        # kernels' cu_seqlens / seq_idx cannot say; trees take the per-path generic route (tree_paths)
        if isinstance(layout, TreeLayout):
            if SETTINGS["path"] == "varlen":
                raise PackmaskError(f"the recurrent path 'varlen' cannot run {where} on shared-prefix tree rows: a "
                                    f"branch starts from its prompt's state, which the kernels' boundaries cannot "
                                    f"say. Use packmask.recurrent.configure(path='auto') (trees then run per path).")
        elif hidden is not None and choose_path(self.plan(), hidden, where) == "varlen":
            return self._varlen(layout, args, kwargs)
        return self._per_sequence(layout, args, kwargs)

    def _varlen_arguments(self, args, kwargs):
        arguments = dict(self.signature.bind(*args, **kwargs).arguments)
        extra = dict(arguments.pop(self.var_keyword, None) or {}) if self.var_keyword else {}

        def convert(name, value):
            if name in CACHE_ARGUMENTS and value is not None:
                raise UnsupportedModelError(
                    f"packmask cannot run the recurrent layer {self.name} ({self.module_class}) on packed input with "
                    f"a cache / state argument {name!r}; pass use_cache=False for packed training.")
            if name == "use_cache":
                return False
            if type(value).__name__ == "PackmaskMask":
                return None  # packmask's mask object: the kernels take the boundaries instead
            if "mask" in name and isinstance(value, torch.Tensor) and value.dim() in (3, 4):
                return None  # a [B, (1,) N, N] mask: the same
            return value

        call = {k: convert(k, v) for k, v in arguments.items() if k not in DROPPED_ARGUMENTS}
        new = self.signature.bind_partial()
        new.arguments.update(call)
        if self.var_keyword:
            new.arguments[self.var_keyword] = {k: convert(k, v) for k, v in extra.items()
                                               if k not in DROPPED_ARGUMENTS}
        return new.args, new.kwargs

    @torch.compiler.disable  # swaps per-instance kernel functions for one call: eager
    def _varlen(self, layout, args, kwargs):
        boundaries = Boundaries.of(layout)
        plan, _ = self.plan()
        funcs = self.module.__dict__["_kernel_funcs"]
        replacements = {name: (cls(name) if cls is CacheOnly else cls(boundaries)) for name, (_, cls) in plan.items()}
        call_args, call_kwargs = self._varlen_arguments(args, kwargs)
        with self._swap:
            saved = {name: funcs[name].__dict__.get("forward") for name in replacements}
            guards = [m.register_forward_pre_hook(_refuse_conv_call) for m in self.module.modules()
                      if is_sequence_conv(m)]
            try:
                for name, replacement in replacements.items():
                    funcs[name].forward = _bound(replacement, funcs[name])
                out = self.original(*call_args, **call_kwargs)
            finally:
                for name, previous in saved.items():
                    if previous is None:
                        funcs[name].__dict__.pop("forward", None)
                    else:
                        funcs[name].forward = previous
                for guard in guards:
                    guard.remove()
        missed = [name for name, r in replacements.items() if getattr(r, "calls", 1) == 0]
        if missed:
            raise PackmaskError(f"packmask's varlen path: {self.name} ({self.module_class}) ran without calling its "
                                f"replaced kernel functions {missed}, so its mixing never saw the boundaries; use "
                                f"packmask.recurrent.configure(path='generic') and report the layer to packmask.")
        return out
