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
``[B, 1, N, N]`` / ``[B, N, N]`` mask  None: a whole document alone needs no mask (arguments named
                                       ``*mask*``)
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
On shared-prefix tree rows the "sequences" are the tree's root-to-leaf paths, gathered token by token,
and each token's output comes from the first path that holds it (:mod:`.tree_paths`).

By default sequences are grouped into few right-padded calls, at the least price per device
(:mod:`packmask.recurrent.batched`: exact because the mixers are causal); ``configure(batched=False)``
makes one call per sequence (padded only where its length equals a size in the layer's parameters, or
is 1, so the token axis of every output is unambiguous).
"""
from __future__ import annotations

import inspect

import torch

from ..errors import UnsupportedModelError
from ..layout_tree import TreeLayout
from ..segments import row_spans_from_cu_seqlens
from .batched import call_overhead_rows_for, gather_tokens, group_index, length_groups, padded_length
from .context import current_layout
from .detect import mixer_kind
from .settings import SETTINGS, configure
from .tree_paths import tree_paths

__all__ = ["SegmentedForward", "CACHE_ARGUMENTS", "DROPPED_ARGUMENTS", "configure"]

#: mixer arguments that carry a cache or a recurrent state: a packed call must not get one
CACHE_ARGUMENTS = frozenset({"cache", "past_key_values", "past_key_value", "cache_params", "layer_past", "state",
                             "inference_params", "past_state", "conv_state", "ssm_state", "recurrent_state"})
#: arguments describing the packed boundaries to a kernel: a per-sequence call has one sequence
DROPPED_ARGUMENTS = frozenset({"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "cu_seqlens",
                               "max_seqlen", "seq_idx", "packmask_layout"})


class _Refuse(Exception):
    pass


class _Ambiguous(Exception):
    pass


@torch.compiler.disable  # a ContextVar read: outside any traced graph
def _layout_now():
    return current_layout()


def _row_spans(layout) -> list[tuple[int, int, int]]:
    memo = layout._memo
    if "row_spans" not in memo:
        memo["row_spans"] = row_spans_from_cu_seqlens(layout.cu_seqlens, layout.seq_len)
    return memo["row_spans"]


def _groups(layout, spans, device, kind: str) -> list[tuple[list[int], int]]:
    """The calls for ``spans`` on ``device`` for a mixer of ``kind`` (:func:`.detect.mixer_kind`): grouped
    by :func:`.batched.length_groups` (once per forward, spans and price, on the layout's memo), no call
    holding more tokens than the packed batch, or one per sequence with ``batched=False``."""
    if not SETTINGS["batched"]:
        return [([i], e - s) for i, (_, s, e) in enumerate(spans)]
    overhead = call_overhead_rows_for(device, SETTINGS["call_overhead_rows"], kind)
    cap = layout.batch_size * layout.seq_len if SETTINGS["cap_calls"] else None
    key = ("length_groups", overhead, cap, tuple(spans))  # the spans too: a tree layout's paths, or its rows
    if key not in layout._memo:
        layout._memo[key] = length_groups(spans, overhead, cap)
    return layout._memo[key]


def _is_mask_object(value) -> bool:
    return type(value).__name__ == "PackmaskMask"


class _Group:
    """Cuts arguments for a group of sequences, right-padded to ``length`` (see :mod:`.batched`)."""

    def __init__(self, layout, spans, members, length, paths=None):
        self.B, self.N, self.length = layout.batch_size, layout.seq_len, length
        self.index, self.valid = (group_index(layout, spans, members, length) if paths is None else
                                  paths.group_index(members, length))  # a tree: its root-to-leaf paths
        key = ("group_rows", tuple(members))  # once per forward (the layout's memo), not once per mixer layer
        if key not in layout._memo:
            layout._memo[key] = torch.tensor([spans[i][0] for i in members], device=self.index.device)
        self.row_index = layout._memo[key]

    def tokens(self, value, name):
        return gather_tokens(value, self.index, self.valid, self.B, self.N, continue_positions=name == "position_ids")

    def channels(self, value):
        return gather_tokens(value, self.index, self.valid, self.B, self.N, channels_first=True)

    def rows(self, value):
        return value.index_select(0, self.row_index.to(value.device))


class _Tokens:
    """A per-sequence output piece whose tokens are on ``axis`` (moved to axis 1 here)."""

    def __init__(self, tensor, axis):
        self.tensor, self.axis = tensor, axis


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
        self.kind = mixer_kind(module)  # prices its grouped calls (.batched)
        self.signature = inspect.signature(original)
        self.var_keyword = next((p.name for p in self.signature.parameters.values() if p.kind == p.VAR_KEYWORD), None)
        # padded lengths avoid these sizes, so an output's token axis is never mistaken (see .batched)
        self.forbidden = frozenset({0, 1}) | frozenset(d for t in (*module.parameters(), *module.buffers())
                                                       for d in t.shape)

    def __call__(self, *args, **kwargs):
        layout = _layout_now()
        if layout is None:
            return self.original(*args, **kwargs)
        return self._per_sequence(layout, args, kwargs)

    @torch.compiler.disable  # under torch.compile the per-sequence calls run eagerly (host ints, Python loops)
    def _per_sequence(self, layout, args, kwargs):
        try:
            arguments, extra = self._bind(layout, args, kwargs)
            paths = tree_paths(layout) if isinstance(layout, TreeLayout) else None  # shared-prefix rows
            spans = _row_spans(layout) if paths is None else paths.spans
            groups = _groups(layout, spans, next(iter(arguments.values())).device, self.kind)
            return self._batched(layout, spans, groups, arguments, extra, paths)
        except _Refuse as why:
            raise UnsupportedModelError(
                f"packmask cannot run the recurrent layer {self.name} ({self.module_class}) per packed sequence: "
                f"{why} Train this model unpacked, or report the layer to packmask.") from None

    def _bind(self, layout, args, kwargs):
        arguments = dict(self.signature.bind(*args, **kwargs).arguments)
        extra = dict(arguments.pop(self.var_keyword, None) or {}) if self.var_keyword else {}
        B, N = layout.batch_size, layout.seq_len
        first = next(iter(arguments.values()), None)
        ok = isinstance(first, torch.Tensor) and first.dim() >= 2 and (
            (first.shape[0], first.shape[-1]) == (B, N) if self.channels_first else tuple(first.shape[:2]) == (B, N))
        if not ok:
            shape = (B, "channels", N) if self.channels_first else (B, N, "...")
            raise _Refuse(f"its first argument is {_describe(first)}, not the hidden states of shape {shape}.")
        return arguments, extra

    def _call(self, arguments, extra, where):
        B, N = where.B, where.N
        call = {k: self._cut(k, v, where, B, N) for k, v in arguments.items()}
        new = self.signature.bind_partial()
        new.arguments.update(call)
        if self.var_keyword:
            new.arguments[self.var_keyword] = {k: self._cut(k, v, where, B, N) for k, v in extra.items()
                                               if k not in DROPPED_ARGUMENTS}
        return self.original(*new.args, **new.kwargs)

    def _batched(self, layout, spans, groups, arguments, extra, paths=None):
        pieces = [None] * len(spans)
        for members, longest in groups:
            length = padded_length(longest, self.forbidden)
            for _ in range(8):  # an output with two axes of the padded length: one token longer
                out = self._call(arguments, extra, _Group(layout, spans, members, length, paths))
                try:
                    split = self._pieces(out, len(members), [spans[i][2] - spans[i][1] for i in members], length)
                    break
                except _Ambiguous:
                    length = padded_length(length + 1, self.forbidden)
            else:  # pragma: no cover - eight collisions in a row
                raise _Refuse("its outputs have several axes of every padded length tried.")
            for i, piece in zip(members, split):
                pieces[i] = piece
        return self._join(pieces, spans, layout, paths)

    def _cut(self, name, value, where, B, N):
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
            return torch.arange(where.length, device=value.device, dtype=value.dtype)
        return self._cut_value(name, value, where, B, N)

    def _cut_value(self, name, value, where, B, N):
        if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
            return value
        if isinstance(value, (tuple, list)):
            return type(value)(self._cut_value(name, v, where, B, N) for v in value)
        if isinstance(value, dict):
            return {k: self._cut_value(name, v, where, B, N) for k, v in value.items()}
        if _is_mask_object(value):
            return None  # packmask's mask: a whole document alone runs with no mask
        if not isinstance(value, torch.Tensor):
            raise _Refuse(f"argument {name!r} is a {type(value).__name__}, which packmask does not know how to cut.")
        shape = tuple(value.shape)
        if self.channels_first and value.dim() == 3 and shape[0] in (B, 1) and shape[-1] == N:
            return where.channels(value)
        if "mask" in name and value.dim() in (3, 4) and shape[-1] == shape[-2] == N and shape[0] in (B, 1) and (
                value.dim() == 3 or shape[1] == 1):
            return None  # a [B, (1,) N, N] mask: the document alone needs none
        if value.dim() >= 2 and shape[0] in (B, 1) and shape[1] == N:
            return where.tokens(value, name)
        if shape and shape[0] == B and N not in shape[1:]:
            return where.rows(value)
        if N not in shape:
            return value  # no batch and no token axis: shared by every sequence (a table, a scalar)
        raise _Refuse(f"argument {name!r} has shape {shape}, with no clear token axis for [batch={B}, tokens={N}].")

    # ---- outputs --------------------------------------------------------------------------------
    def _pieces(self, out, count, lengths, padded):
        """Split one call's output into ``count`` per-sequence pieces: token tensors cut to each
        sequence's length (``_Tokens``), batch tensors per sequence, anything else shared."""
        if out is None:
            return [None] * count
        if isinstance(out, torch.Tensor):
            if out.dim() >= 2 and out.shape[0] == count:
                axes = [a for a in range(1, out.dim()) if out.shape[a] == padded]
                if self.channels_first:
                    axes = axes[-1:]
                if len(axes) > 1:
                    raise _Ambiguous()
                if axes:
                    moved = out.movedim(axes[0], 1)
                    return [_Tokens(moved[j:j + 1, :n], axes[0]) for j, n in enumerate(lengths)]
            if out.dim() >= 1 and out.shape[0] == count:
                return [out[j:j + 1] for j in range(count)]
            return [out] * count
        if isinstance(out, (tuple, list)) and not hasattr(out, "_fields"):
            parts = [self._pieces(v, count, lengths, padded) for v in out]
            return [type(out)(p[j] for p in parts) for j in range(count)]
        if isinstance(out, dict):
            parts = {k: self._pieces(v, count, lengths, padded) for k, v in out.items()}
            return [(type(out)(**{k: p[j] for k, p in parts.items()}) if type(out) is not dict else
                     {k: p[j] for k, p in parts.items()}) for j in range(count)]
        return [out] * count

    def _join(self, pieces, spans, layout, paths):
        last_of_row = [i for i, (b, _, _) in enumerate(spans) if i + 1 == len(spans) or spans[i + 1][0] != b]
        return self._join_values(pieces, last_of_row, layout.batch_size, layout.seq_len, paths)

    def _join_values(self, values, last_of_row, B, N, paths=None):
        first = values[0]
        if first is None:
            return None
        if isinstance(first, _Tokens):  # every token in flattened order: [1, B*N, ..] -> [B, N, ..], axis back
            if not all(isinstance(v, _Tokens) and v.axis == first.axis for v in values):
                raise _Refuse("its per-sequence outputs disagree on where the tokens are.")
            tensors = [v.tensor for v in values]
            joined = torch.cat(tensors, dim=1) if paths is None else paths.join(tensors)  # a tree: owned tokens
            joined = joined.unflatten(1, (B, N)).squeeze(0)
            return joined.movedim(1, first.axis)
        if isinstance(first, torch.Tensor):
            if first.dim() >= 1 and first.shape[0] == 1:
                return torch.cat([values[i] for i in last_of_row], dim=0)  # a state: each row's last sequence
            return first
        if isinstance(first, (tuple, list)) and not hasattr(first, "_fields"):
            return type(first)(self._join_values([v[i] for v in values], last_of_row, B, N, paths)
                               for i in range(len(first)))
        if isinstance(first, dict):
            joined = {k: self._join_values([v[k] for v in values], last_of_row, B, N, paths) for k in first}
            return type(first)(**joined) if type(first) is not dict else joined
        return first


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__
