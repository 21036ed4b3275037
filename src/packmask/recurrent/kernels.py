"""Varlen kernel functions: transformers' recurrent kernel functions, given a packed row's boundaries.

transformers (5.25) declares a recurrent layer's kernels as swappable functions
(``use_kernel_func_from_hub_with_fallback`` / ``use_kernel_forward_from_hub``) and gives every
layer *instance* its own wrapper of each (``layer._kernel_funcs[name]``, from the ``kernels``
package's ``use_kernelized_func``): the layer's code calls the module-level function, which routes
to the instance's wrapper, whose ``forward`` ``kernels.kernelize`` replaces. packmask's fast path
sets those per-instance ``forward`` s, for the duration of one packed call, to the functions here:
each has the signature of the function it stands in for and runs the kernel over the whole packed
row, flattened to one ``[1, B * N]`` sequence, with the layout's boundaries::

    row 0  a0 a1 a2 b0 b1     layout cu_seqlens [0, 3, 5, 9, 10]
    row 1  c0 c1 c2 c3 P      -> one kernel call on [a0 .. b1 c0 .. P], cu_seqlens [0, 3, 5, 9, 10]

===============================  ==============================================================
transformers' function           varlen kernel
===============================  ==============================================================
``chunk_gated_delta_rule``       flash-linear-attention's, ``cu_seqlens`` (Qwen3.5, Qwen3-Next, ...)
``chunk_kda``                    flash-linear-attention's, ``cu_seqlens`` (Kimi Linear, ...)
``causal_conv1d_fn``             flash-linear-attention's ``causal_conv1d``, ``cu_seqlens``
``mamba_chunk_scan_combined``    mamba-ssm's, ``seq_idx`` (Mamba2 hybrids; CUDA only), else fla's
                                 ``chunk_simple_gla`` with ``cu_seqlens`` (the same scan)
``mamba_split_conv1d_scan_...``  None: the layer's own signal to take its unfused path (above)
cache / decode functions         refused: packed input never runs with a cache
===============================  ==============================================================

Boundaries come from the layout (:mod:`packmask.segments` computes them); nothing here derives them.
"""
from __future__ import annotations

import importlib.util
import sys
from functools import lru_cache

import torch

from ..errors import PackmaskError

__all__ = ["EXTRAS", "kernels_available", "kernel_hooks_available", "Boundaries", "VARLEN_FUNCTIONS",
           "CACHE_ONLY_FUNCTIONS", "ROUTING_FUNCTIONS", "NoFusion", "CacheOnly"]

#: how to install each kernel package
EXTRAS = {"fla": "pip install 'packmask[fla]'  (flash-linear-attention's fla-core: Triton kernels)",
          "mamba": "pip install 'packmask[mamba]'  (mamba-ssm and causal-conv1d: CUDA kernels)",
          "kernels": "pip install 'packmask[fla]'  (it brings the `kernels` package transformers' hooks need)"}


@lru_cache(maxsize=None)
def _importable(*names: str) -> bool:
    try:
        return all(importlib.util.find_spec(name) is not None for name in names)
    except (ImportError, ValueError):  # pragma: no cover - a broken install
        return False


def kernels_available(package: str) -> bool:
    """Whether the kernel package ``"fla"`` (fla + triton) or ``"mamba"`` (mamba_ssm + causal_conv1d)
    can be imported here (not imported by this check)."""
    return _importable("fla", "triton") if package == "fla" else _importable("mamba_ssm", "causal_conv1d")


def kernel_hooks_available(module) -> bool:
    """Whether ``module`` has kernel-function wrappers of its own (transformers with ``kernels`` >= 0.19).

    Older ``kernels`` releases (0.16, which transformers 5.17 takes) list the *shared* module-level
    wrapper in ``_kernel_funcs``: replacing its ``forward`` would change every model in the process,
    so such layers have no per-instance hook (the varlen path refuses them).
    """
    funcs = module.__dict__.get("_kernel_funcs")
    if not isinstance(funcs, dict) or not funcs or not all(isinstance(f, torch.nn.Module) for f in funcs.values()):
        return False
    shared = {id(v) for v in vars(sys.modules.get(type(module).__module__, object)).values()}
    return not any(id(f) in shared for f in funcs.values())


class Boundaries:
    """A packed row's boundaries in the forms kernels take, built once per layout (cached on it)."""

    def __init__(self, layout):
        self.batch_size, self.seq_len = layout.batch_size, layout.seq_len
        self.cu_seqlens = layout.cu_seqlens.reshape(-1).long()
        self._layout = layout

    @classmethod
    def of(cls, layout) -> "Boundaries":
        """The boundaries of ``layout``, built by the first mixer of a forward and reused by the others."""
        memo = layout._memo
        if "varlen_boundaries" not in memo:
            memo["varlen_boundaries"] = cls(layout)
        return memo["varlen_boundaries"]

    def seq_idx(self) -> torch.Tensor:
        """``[B, N]`` int32 document index of every token (mamba-ssm's ``seq_idx``)."""
        memo = self._layout._memo
        if "varlen_seq_idx" not in memo:  # the layout's document ids (derived once), as the kernel's int32
            memo["varlen_seq_idx"] = self._layout.doc_ids.to(torch.int32)
        return memo["varlen_seq_idx"]

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, ...]`` -> ``[1, B * N, ...]`` (varlen kernels take one flattened sequence)."""
        return x.reshape(1, self.batch_size * self.seq_len, *x.shape[2:])

    def unflat(self, x: torch.Tensor) -> torch.Tensor:
        """``[1, B * N, ...]`` -> ``[B, N, ...]`` (the kernel's output back in the layer's shape)."""
        return x.reshape(self.batch_size, self.seq_len, *x.shape[2:])


def _no_state(name, initial_state, output_final_state):
    if initial_state is not None or output_final_state:
        raise PackmaskError(f"packmask's varlen {name} got a recurrent state (initial_state / output_final_state) on "
                            f"packed input; packed rows run without a cache. Pass use_cache=False.")


class _Varlen:
    def __init__(self, boundaries: Boundaries):
        self.b = boundaries
        self.calls = 0  # the dispatcher checks the layer really ran its mixing through the kernel


class FlaGatedDeltaRule(_Varlen):
    """transformers' ``chunk_gated_delta_rule`` -> fla's, over the packed row with ``cu_seqlens``."""

    def __call__(self, query, key, value, g, beta, chunk_size=64, initial_state=None, output_final_state=False,
                 use_qk_l2norm_in_kernel=False, **kwargs):
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        _no_state("gated delta rule", initial_state, output_final_state)
        self.calls += 1
        b = self.b
        out, _ = chunk_gated_delta_rule(b.flat(query), b.flat(key), b.flat(value), g=b.flat(g), beta=b.flat(beta),
                                        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, cu_seqlens=b.cu_seqlens)
        return b.unflat(out), None


class FlaKimiDeltaAttention(_Varlen):
    """transformers' ``chunk_kda`` -> fla's, over the packed row with ``cu_seqlens``."""

    def __call__(self, q, k, v, g, beta, initial_state=None, output_final_state=False,
                 use_qk_l2norm_in_kernel=False, **kwargs):
        from fla.ops.kda import chunk_kda

        _no_state("kimi delta attention", initial_state, output_final_state)
        self.calls += 1
        b = self.b
        extra = {k_: v_ for k_, v_ in kwargs.items() if k_ in ("scale", "use_gate_in_kernel", "A_log", "dt_bias",
                                                                "lower_bound", "safe_gate")}
        out, _ = chunk_kda(b.flat(q), b.flat(k), b.flat(v), g=b.flat(g), beta=b.flat(beta),
                           use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, cu_seqlens=b.cu_seqlens, **extra)
        return b.unflat(out), None


class FlaCausalConv1d(_Varlen):
    """transformers' ``causal_conv1d_fn`` (``[B, C, N]`` in and out) -> fla's ``causal_conv1d``
    over the packed row with ``cu_seqlens`` (no convolution reaches across a boundary)."""

    def __call__(self, hidden_states, weight, bias=None, activation=None, **kwargs):
        from fla.modules.causal_conv1d import causal_conv1d

        if activation not in (None, "silu", "swish"):
            raise PackmaskError(f"packmask's varlen convolution supports activation None / 'silu', got "
                                f"{activation!r}; use packmask.recurrent.configure(path='generic').")
        self.calls += 1
        b = self.b
        x = b.flat(hidden_states.transpose(1, 2))
        out, _ = causal_conv1d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                               activation=activation, cu_seqlens=b.cu_seqlens)
        return b.unflat(out).transpose(1, 2)


class MambaCausalConv1d(_Varlen):
    """transformers' ``causal_conv1d_fn`` -> causal-conv1d's, with ``seq_idx`` (CUDA)."""

    def __call__(self, hidden_states, weight, bias=None, activation=None, **kwargs):
        from causal_conv1d import causal_conv1d_fn

        self.calls += 1
        x = hidden_states.transpose(1, 2).contiguous().transpose(1, 2)  # channels-last, as seq_idx requires
        return causal_conv1d_fn(x, weight, bias, seq_idx=self.b.seq_idx(), activation=activation)


class MambaChunkScan(_Varlen):
    """transformers' ``mamba_chunk_scan_combined`` -> mamba-ssm's, with ``seq_idx`` (CUDA)."""

    def __call__(self, hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
                 dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False, z=None, **kwargs):
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        _no_state("Mamba2 scan", initial_states, return_final_states)
        self.calls += 1
        return mamba_chunk_scan_combined(hidden_states, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                         seq_idx=self.b.seq_idx(), dt_softplus=dt_softplus, dt_limit=dt_limit)


class FlaMamba2Scan(_Varlen):
    """transformers' ``mamba_chunk_scan_combined`` -> fla's ``chunk_simple_gla`` with ``cu_seqlens``.

    Mamba2's scan (state space duality) is gated linear attention with one decay per head:
    ``h_t = exp(dt_t A) h_(t-1) + B_t (dt_t x_t)^T``, ``y_t = C_t h_t + D x_t``, i.e. queries ``C``,
    keys ``B`` (groups repeated to heads, consecutively as transformers does), values ``dt * x``, log
    decay ``dt * A``, scale 1; ``dt`` gets ``dt_bias``, softplus and the ``dt_limit`` clamp first.
    """

    def __call__(self, hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
                 dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False, z=None, **kwargs):
        from fla.ops.simple_gla import chunk_simple_gla

        _no_state("Mamba2 scan", initial_states, return_final_states)
        if z is not None:
            raise PackmaskError("packmask's varlen Mamba2 scan got a gate z (the fused norm-gate variant); use "
                                "packmask.recurrent.configure(path='generic').")
        self.calls += 1
        b, dtype = self.b, hidden_states.dtype
        heads, groups = hidden_states.shape[2], B.shape[2]
        dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
        dt = torch.nn.functional.softplus(dt) if dt_softplus else dt
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
        q, k = (t.repeat_interleave(heads // groups, dim=2, output_size=heads).to(dtype) for t in (C, B))
        v = (hidden_states.float() * dt[..., None]).to(dtype)
        out, _ = chunk_simple_gla(b.flat(q), b.flat(k), b.flat(v), g=b.flat(A.float() * dt), scale=1.0,
                                  cu_seqlens=b.cu_seqlens)
        out = b.unflat(out)
        if D is not None:
            out = out + D.to(out.dtype)[:, None] * hidden_states.to(out.dtype)
        return out


class NoFusion(_Varlen):
    """``mamba_split_conv1d_scan_combined``: None, the layer's own signal to run its unfused path
    (whose convolution and scan are replaced above)."""

    def __init__(self, boundaries: Boundaries):
        super().__init__(boundaries)
        self.calls = None  # not a mixing function: no call expected

    def __call__(self, *args, **kwargs):
        return None


class CacheOnly:
    """A decode-time function (one token against a cache): never on packed input."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise PackmaskError(f"packmask's varlen path reached {self.name}, a decode step over a cache, on packed input; "
                            f"packed rows run without a cache. Pass use_cache=False.")


#: transformers' kernel function -> ``{kernel package: varlen replacement}`` (first available wins)
VARLEN_FUNCTIONS = {
    "chunk_gated_delta_rule": {"fla": FlaGatedDeltaRule},
    "chunk_kda": {"fla": FlaKimiDeltaAttention},
    "causal_conv1d_fn": {"fla": FlaCausalConv1d, "mamba": MambaCausalConv1d},
    "mamba_chunk_scan_combined": {"mamba": MambaChunkScan, "fla": FlaMamba2Scan},
    "mamba_split_conv1d_scan_combined": {None: NoFusion},
}
#: functions only a cached decode step calls: replaced by :class:`CacheOnly` during a packed call
CACHE_ONLY_FUNCTIONS = frozenset({"fused_recurrent_gated_delta_rule", "fused_recurrent_kda", "causal_conv1d_update",
                                  "selective_state_update"})
#: functions that only route to the ones above (their cache argument is None on packed input): kept
ROUTING_FUNCTIONS = frozenset({"causal_conv1d_forward", "mamba2_scan_forward"})
