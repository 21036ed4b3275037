"""The generic exact path: a mixer runs once per packed sequence, with its own forward, on its slice.

A recurrent / convolutional mixer carries state from token to token. Run on a packed row it would
carry the state of one sequence into the next. :class:`SegmentedForward` replaces the ``forward``
of *one mixer instance* (explicitly, like PEFT and Liger; transformers' classes are never touched):
on a packed forward it cuts every per-token argument at the layout's boundaries, calls the
module's original forward once per sequence (a fresh zero state, no cache), and concatenates the
outputs back in place. Exact by construction, with no model-specific math::

    hidden_states  [a0 a1 a2 b0 b1 | c0 c1 c2 c3 P]     layout: cu_seqlens [0, 3, 5, 9, 10]
    calls          mixer([a0 a1 a2])  mixer([b0 b1])  mixer([c0 c1 c2 c3])  mixer([P])
    output         [A0 A1 A2 B0 B1 | C0 C1 C2 C3 P']    (each as if its sequence ran alone)

How arguments are cut for the sequence ``(row b, tokens s:e)``:

=====================================  ==============================================================
argument                               per sequence
=====================================  ==============================================================
``[B, N, ...]`` tensor (hidden states,  ``[b:b+1, s:e]`` (``[1, N, ...]`` broadcasts: ``[:, s:e]``)
2D padding mask, ``position_ids``,
``(cos, sin)``, ...)
``[B, C, N]`` (a wrapped ``Conv1d``)   ``[b:b+1, :, s:e]``
``[B, 1, N, N]`` / ``[B, N, N]`` mask  None: a whole document alone needs no mask
packmask's mask object                 None (the same)
``[B, ...]`` tensor without tokens     ``[b:b+1]``
``cache_position``                     ``arange(e - s)``
``use_cache``                          False
cache / state arguments                must be None (packed input with a cache is refused)
``cu_seq_lens_*``, ``seq_idx``, ...    dropped: each call holds one sequence
anything else per token                :class:`~packmask.UnsupportedModelError` naming it
=====================================  ==============================================================

Outputs: per-token tensors (``[1, e - s, ...]``, or the tokens on another axis such as
``[1, heads, e - s, d]``) are concatenated back into ``[B, N, ...]``; other
tensors with a batch dimension (a final recurrent state) keep each row's last sequence's value.
On input that is not packed (no layout active) the wrapper calls the original forward unchanged.
"""
from __future__ import annotations

import inspect

import torch

from ..errors import UnsupportedModelError
from ..segments import row_spans_from_cu_seqlens
from .context import current_layout

__all__ = ["SegmentedForward", "CACHE_ARGUMENTS", "DROPPED_ARGUMENTS"]

#: mixer arguments that carry a cache or a recurrent state: a packed call must not get one
CACHE_ARGUMENTS = frozenset({"cache", "past_key_values", "past_key_value", "cache_params", "layer_past", "state",
                             "inference_params", "past_state", "conv_state", "ssm_state", "recurrent_state"})
#: arguments describing the packed boundaries to a kernel: a per-sequence call has one sequence
DROPPED_ARGUMENTS = frozenset({"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "cu_seqlens",
                               "max_seqlen", "seq_idx", "packmask_layout"})


class _Refuse(Exception):
    pass


def _row_spans(layout) -> list[tuple[int, int, int]]:
    memo = layout._memo
    if "row_spans" not in memo:
        memo["row_spans"] = row_spans_from_cu_seqlens(layout.cu_seqlens, layout.seq_len)
    return memo["row_spans"]


def _is_mask_object(value) -> bool:
    return type(value).__name__ == "PackmaskMask"


class SegmentedForward:
    """The replacement ``forward`` of one mixer instance (see the module docstring).

    ``original`` is the forward it replaces (bound to the module); ``channels_first`` marks a
    wrapped ``nn.Conv1d`` (tokens on the last axis).
    """

    def __init__(self, module: torch.nn.Module, original, name: str):
        self.original = original
        self.name = name
        self.module_class = type(module).__name__
        self.channels_first = isinstance(module, torch.nn.Conv1d)
        self.signature = inspect.signature(original)
        self.var_keyword = next((p.name for p in self.signature.parameters.values() if p.kind == p.VAR_KEYWORD), None)

    def __call__(self, *args, **kwargs):
        layout = current_layout()
        if layout is None:
            return self.original(*args, **kwargs)
        return self.per_segment(layout, args, kwargs)

    # ---- the per-segment run --------------------------------------------------------------------
    def per_segment(self, layout, args, kwargs):
        bound = self.signature.bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        extra = dict(arguments.pop(self.var_keyword, None) or {}) if self.var_keyword else {}
        B, N = layout.batch_size, layout.seq_len
        first = next(iter(arguments.values()), None)
        expected = (B, None, N) if self.channels_first else (B, N)
        if not isinstance(first, torch.Tensor) or first.dim() < 2 or (
                (first.shape[0], first.shape[-1]) != (B, N) if self.channels_first else tuple(first.shape[:2]) != (B, N)):
            raise UnsupportedModelError(
                f"packmask cannot run the recurrent layer {self.name} ({self.module_class}) per "
                f"packed sequence: its first argument is {_describe(first)}, not the hidden states of shape "
                f"{expected}. Train this model unpacked.")
        spans = _row_spans(layout)
        outputs = []
        for b, s, e in spans:
            try:
                call = {k: self._cut(k, v, b, s, e, B, N) for k, v in arguments.items()}
                call_extra = {k: self._cut(k, v, b, s, e, B, N) for k, v in extra.items() if k not in DROPPED_ARGUMENTS}
            except _Refuse as why:
                raise UnsupportedModelError(
                    f"packmask cannot run the recurrent layer {self.name} ({self.module_class}) per "
                    f"packed sequence: {why} Train this model unpacked, or report the layer to packmask.") from None
            new = self.signature.bind_partial()
            new.arguments.update(call)
            if self.var_keyword:
                new.arguments[self.var_keyword] = call_extra
            outputs.append(self.original(*new.args, **new.kwargs))
        return self._join(outputs, spans, B, N)

    def _cut(self, name, value, b, s, e, B, N):
        if name in DROPPED_ARGUMENTS:
            return None
        if name in CACHE_ARGUMENTS:
            if value is not None:
                raise _Refuse(f"it got a cache / state argument {name!r} on packed input, and packed sequences "
                              f"cannot share a cache. Pass use_cache=False for packed training.")
            return None
        if name == "use_cache":
            return False
        if name == "cache_position" and isinstance(value, torch.Tensor):
            return torch.arange(e - s, device=value.device, dtype=value.dtype)
        return self._cut_value(name, value, b, s, e, B, N)

    def _cut_value(self, name, value, b, s, e, B, N):
        if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
            return value
        if isinstance(value, (tuple, list)):
            return type(value)(self._cut_value(name, v, b, s, e, B, N) for v in value)
        if isinstance(value, dict):
            return {k: self._cut_value(name, v, b, s, e, B, N) for k, v in value.items()}
        if _is_mask_object(value):
            return None  # packmask's mask: a whole document alone runs with no mask
        if not isinstance(value, torch.Tensor):
            raise _Refuse(f"argument {name!r} is a {type(value).__name__}, which packmask does not know how to cut.")
        shape = tuple(value.shape)
        rows = slice(b, b + 1) if shape and shape[0] == B else slice(0, 1)
        if self.channels_first and value.dim() == 3 and shape[0] in (B, 1) and shape[-1] == N:
            return value[rows, :, s:e]
        if value.dim() in (3, 4) and shape[-1] == shape[-2] == N and shape[0] in (B, 1) and (
                value.dim() == 3 or shape[1] == 1):
            return None  # a [B, (1,) N, N] mask: the document alone needs none
        if value.dim() >= 2 and shape[0] in (B, 1) and shape[1] == N:
            return value[rows, s:e]
        if shape and shape[0] == B and N not in shape[1:]:
            return value[b:b + 1]
        if N not in shape:
            return value  # no batch and no token axis: shared by every sequence (a table, a scalar)
        raise _Refuse(f"argument {name!r} has shape {shape}, with no clear token axis for [batch={B}, tokens={N}].")

    def _join(self, outputs, spans, B, N):
        lengths = [e - s for _, s, e in spans]
        last_of_row = [i for i, (b, _, _) in enumerate(spans) if i + 1 == len(spans) or spans[i + 1][0] != b]
        return self._join_values(outputs, lengths, last_of_row, B, N)

    def _token_axis(self, values, lengths) -> int | None:
        """The axis holding the tokens of per-sequence outputs: the one whose size is each sequence's
        length (axis 1 first, or the last for a wrapped ``Conv1d``; some mixers return ``[1, heads, L, d]``)."""
        first = values[0]
        if first.dim() < 2 or first.shape[0] != 1:
            return None
        axes = list(range(1, first.dim()))
        if self.channels_first:
            axes.reverse()
        for axis in axes:
            if all(v.dim() == first.dim() and v.shape[axis] == n for v, n in zip(values, lengths)):
                return axis
        return None

    def _join_values(self, values, lengths, last_of_row, B, N):
        first = values[0]
        if first is None:
            return None
        if isinstance(first, torch.Tensor):
            axis = self._token_axis(values, lengths)
            if axis is not None:  # the spans cover every token in flattened order: [1, .., B*N, ..] -> [B, .., N, ..]
                joined = torch.cat(values, dim=axis).unflatten(axis, (B, N))
                return joined.movedim(axis, 0).squeeze(1)
            if first.dim() >= 1 and first.shape[0] == 1:
                return torch.cat([values[i] for i in last_of_row], dim=0)  # a state: each row's last sequence
            raise UnsupportedModelError(
                f"packmask cannot join the outputs of the recurrent layer {self.name} over packed sequences: an "
                f"output of shape {tuple(first.shape)} has no batch axis. Train this model unpacked.")
        if isinstance(first, (tuple, list)) and not hasattr(first, "_fields"):
            return type(first)(self._join_values([v[i] for v in values], lengths, last_of_row, B, N)
                               for i in range(len(first)))
        if isinstance(first, dict):
            joined = {k: self._join_values([v[k] for v in values], lengths, last_of_row, B, N) for k in first}
            return type(first)(**joined) if type(first) is not dict else joined
        return first


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__
