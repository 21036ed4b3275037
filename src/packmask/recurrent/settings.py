"""How packed forwards run the recurrent mixers: which path, and how the generic path groups calls.

Two paths run a mixer on a packed row (see :mod:`packmask.recurrent.varlen` for the dispatcher):

* ``generic`` — the mixer's own forward once per packed sequence (grouped into right-padded calls by
  default, priced by ``call_overhead_rows`` (:mod:`.batched`); ``batched=False``: one call per
  sequence). Exact by construction, every family, any device.
* ``varlen`` — the mixer's forward *once* over the whole packed row, its kernel functions given the
  layout's boundaries (``cu_seqlens`` for flash-linear-attention, ``seq_idx`` for mamba-ssm). Needs
  the kernels (``pip install 'packmask[fla]'`` / ``'packmask[mamba]'``) and CUDA tensors.

``path="auto"`` (the default) takes ``varlen`` where it honours the call and ``generic`` otherwise;
``path="generic"`` never uses a kernel path; ``path="varlen"`` refuses (a
:class:`~packmask.PackmaskError` naming the reason and the pip extra) wherever the kernel path
cannot run. ``cpu_kernels=True`` lets the kernel path take CPU tensors: only for tests under
Triton's interpreter (``TRITON_INTERPRET=1``), where flash-linear-attention's kernels run in numpy.

Settings are process-wide values set explicitly (no environment variables); :func:`configure`
returns the previous ones so a caller can put them back.

>>> previous = configure(path="generic")
>>> previous["path"], configure(**previous)["path"]
('auto', 'generic')
"""
from __future__ import annotations

import math

from ..errors import PackmaskError

__all__ = ["SETTINGS", "PATHS", "configure", "checked_call_overhead"]

#: the recurrent paths a caller can ask for
PATHS = ("auto", "generic", "varlen")

#: the current settings (read by :mod:`.segmented` and :mod:`.varlen`; change them with :func:`configure`)
SETTINGS = {"batched": True, "path": "auto", "cpu_kernels": False, "call_overhead_rows": "auto", "cap_calls": True}


def configure(*, batched: bool | None = None, path: str | None = None, cpu_kernels: bool | None = None,
              call_overhead_rows: float | str | None = None, cap_calls: bool | None = None) -> dict:
    """Set how packed forwards run the mixers; returns the previous settings (see the module doc).

    ``batched``: the generic path groups sequences into a few right-padded calls (True, default;
    priced by ``call_overhead_rows``) or makes one call per sequence (False). ``path``: one of :data:`PATHS`.
    ``cpu_kernels``: let the kernel path run on CPU tensors (tests under ``TRITON_INTERPRET=1``).
    ``call_overhead_rows``: what one grouped call costs, in extra padded rows of its length (a number
    >= 0 for every device; ``"auto"``: the device's :data:`.batched.CALL_OVERHEAD_ROWS`). Larger
    makes fewer, more padded calls. ``cap_calls``: no grouped call holds more token slots than the packed
    batch itself (True, default: the mixers' activations peak no higher than an unpacked run's).

    >>> configure(batched=False)["batched"], configure(batched=True)["batched"]
    (True, False)
    >>> configure(path="fast")
    Traceback (most recent call last):
    ...
    packmask.errors.PackmaskError: configure(path=...) takes one of ('auto', 'generic', 'varlen'), got 'fast'.
    >>> configure(call_overhead_rows=-1)
    Traceback (most recent call last):
    ...
    packmask.errors.PackmaskError: configure(call_overhead_rows=...) takes "auto" or a number >= 0, got -1.
    """
    previous = dict(SETTINGS)
    for name, value in (("batched", batched), ("cpu_kernels", cpu_kernels), ("cap_calls", cap_calls)):
        if value is not None:
            if not isinstance(value, bool):
                raise PackmaskError(f"configure({name}=...) takes True or False, got {value!r}.")
            SETTINGS[name] = value
    if path is not None:
        if path not in PATHS:
            raise PackmaskError(f"configure(path=...) takes one of {PATHS}, got {path!r}.")
        SETTINGS["path"] = path
    if call_overhead_rows is not None:
        SETTINGS["call_overhead_rows"] = checked_call_overhead(call_overhead_rows)
    return previous


def checked_call_overhead(value):
    """``value`` if it is ``"auto"`` or a finite number >= 0, else a one-line :class:`PackmaskError`.

    >>> checked_call_overhead("auto"), checked_call_overhead(2.5)
    ('auto', 2.5)
    >>> checked_call_overhead(float("nan"))
    Traceback (most recent call last):
    ...
    packmask.errors.PackmaskError: configure(call_overhead_rows=...) takes "auto" or a number >= 0, got nan.
    """
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if value == "auto" or (number and math.isfinite(value) and value >= 0):
        return value
    raise PackmaskError(f"configure(call_overhead_rows=...) takes \"auto\" or a number >= 0, got {value!r}.")
