"""Cost-based choice among the document kernels (cudnn / varlen / flex), from measured rates.

A *cost table* holds, per GPU model and head dim, each kernel's measured forward+backward TFLOP/s on
rows made of equal documents of length 128, 256, ..., 16384 (``python -m packmask.backends.calibrate``
measures it and writes it to the user cache; an H100 table ships with packmask). A layout's cost
under a kernel is the sum over its documents of ``flops(document) / rate(kernel, length bucket)``:
short documents are priced at the kernel's short-document rate, long ones at its long rate.

Worked example (a made-up table): documents of 300 and 3000 tokens, one head of dim 64::

    bucket          256      2048          (each document is priced at its nearest bucket below)
    cudnn TFLOP/s   100       400
    varlen TFLOP/s  150       250
    cost(cudnn)  = f(300) / 100 + f(3000) / 400
    cost(varlen) = f(300) / 150 + f(3000) / 250     -> the long document decides: cudnn

>>> table = {"buckets": [256, 2048], "rates": {"64": {"cudnn": [100, 400], "varlen": [150, 250]}}}
>>> lengths = [300, 3000]
>>> cost = {k: estimate_ms(k, lengths, heads=1, head_dim=64, table=table) for k in ("cudnn", "varlen")}
>>> min(cost, key=cost.get)
'cudnn'
>>> min(("cudnn", "varlen"), key=lambda k: estimate_ms(k, [300] * 40, 1, 64, table))
'varlen'
"""
from __future__ import annotations

import bisect
import json
import os
from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["BUCKETS", "KERNELS", "cache_path", "load_table", "estimate_ms", "choose_kernel", "write_table",
           "choose_tree_kernel", "is_decode_layout", "DECODE_MAX_QUERIES", "TREE_MARGIN", "DECODE_MARGIN",
           "margin_choice"]

BUCKETS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
KERNELS = ("cudnn", "varlen", "flex")  # the kernels priced by the table (others are fallbacks)
_SHIPPED = Path(__file__).with_name("kernel_costs.json")


def cache_path() -> Path:
    """Where ``calibrate`` writes: ``$PACKMASK_COST_TABLE``, else ``$XDG_CACHE_HOME/packmask/kernel_costs.json``."""
    if os.environ.get("PACKMASK_COST_TABLE"):
        return Path(os.environ["PACKMASK_COST_TABLE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "packmask" / "kernel_costs.json"


def _read(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


@lru_cache(maxsize=None)
def load_table(device_name: str) -> dict | None:
    """The table for a GPU model: the user's calibration first, else the one shipped with packmask."""
    for path in (cache_path(), _SHIPPED):
        table = _read(path).get("devices", {}).get(device_name)
        if table:
            return dict(table, source=str(path))
    return None


def write_table(device_name: str, table: dict, path: Path | None = None) -> Path:
    """Merge one device's table into the JSON file at ``path`` (atomically: temp file + rename)."""
    path = Path(path or cache_path())
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _read(path)
    data.setdefault("devices", {})[device_name] = table
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
    load_table.cache_clear()
    return path


def _rate(table: dict, kernel: str, head_dim: int, length: int) -> float | None:
    rates = table["rates"]
    dims = sorted(int(d) for d in rates)
    d = min(dims, key=lambda x: (abs(x - head_dim), x))
    row = rates[str(d)].get(kernel)
    if not row:
        return None
    i = max(0, bisect.bisect_right(table["buckets"], length) - 1)
    return row[i] or None


def estimate_ms(kernel: str, seq_lengths, heads: int, head_dim: int, table: dict, causal: bool = True,
                layers: int = 1, row_len: int | None = None) -> float:
    """Forward+backward milliseconds per layer the table predicts for ``kernel`` on these documents
    (inf: not measured), including its once-per-forward setup spread over ``layers`` layers."""
    setup = table.get("setup_ms", {}).get(kernel, 0.0)
    tokens = sum(seq_lengths)
    row = row_len or tokens
    total = setup * (tokens / row) * (row / table.get("row_tokens", 16384)) ** 2 / max(1, layers)
    for length in seq_lengths:
        if length <= 0:
            continue
        rate = _rate(table, kernel, head_dim, length)
        if rate is None:
            return float("inf")
        pairs = length * length / (2 if causal else 1)
        total += 4.0 * pairs * heads * head_dim * 3.5 / (rate * 1e9)
    return total


def layout_lengths(layout) -> list[int]:
    """The layout's document lengths, read once per layout (one small device-to-host copy)."""
    memo = layout._memo
    if "lengths" not in memo:
        memo["lengths"] = layout.seq_lengths
    return memo["lengths"]


def _device_name(q: torch.Tensor) -> str | None:
    return torch.cuda.get_device_name(q.device) if q.is_cuda else None


def choose_kernel(candidates, layout, q: torch.Tensor, layers: int = 1) -> tuple[str, dict]:
    """The cheapest of ``candidates`` (kernels that can run the call exactly) and the estimates.

    Without a table for this GPU model, or under ``torch.compile`` (where reading the layout's
    lengths would stop the graph), the first candidate wins: the dispatcher lists them fastest first.
    """
    if hasattr(layout, "parent"):  # tree-kernel: tree layouts are priced by their own measured rows
        return choose_tree_kernel(candidates, layout, q)
    priced = [c for c in candidates if c in KERNELS]
    if len(priced) < 2:
        return candidates[0], {"reason": "only candidate" if len(candidates) == 1 else "unpriced"}
    if torch.compiler.is_compiling():
        return candidates[0], {"reason": "static order under torch.compile"}
    if getattr(layout, "cu_seqlens", None) is None:  # tree layouts: the table prices documents only
        return candidates[0], {"reason": "the cost table prices document layouts; the first candidate wins"}
    name = _device_name(q)
    table = load_table(name) if name else None
    if table is None or "rates" not in table:  # a table of tree rows only (calibrate --trees-only)
        return candidates[0], {"reason": "no document rows in the cost table for this GPU "
                                         "(python -m packmask.backends.calibrate)"}
    memo = layout._memo
    key = ("kernel_choice", tuple(priced), q.shape[1], q.shape[-1], layers)
    if key not in memo:
        lengths = layout_lengths(layout)
        est = {c: estimate_ms(c, lengths, q.shape[1], q.shape[-1], table, layout.causal, layers,
                              layout.seq_len) for c in priced}
        memo[key] = (min(est, key=est.get), {"estimated_ms": est, "source": table.get("source")})
    return memo[key]


# ---- tree layouts (tree-kernel) -----------------------------------------------------------------------
#: a tree layout over a KV cache with at most this many new tokens per row is a *decode* call (draft-tree
#: verification): dense sdpa over the [B, 1, N, past + N] mask is what a user would write there
DECODE_MAX_QUERIES = 256


#: the table's tree rows time the kernels alone; whole training steps on the H200 (2026-12-05, d = 64) put
#: tree_triton within 1% of varlen on DPO and the tree step but 5-7% behind on GRPO and agentic trees
#: (docs/benchmarks.md), so another kernel replaces varlen only when its kernel time is this much faster
TREE_MARGIN = 1.10
#: a draft-tree verification forward is host-bound (H200, 2026-12-05: GPU busy 27 of 46 ms at batch 8), so
#: a kernel's time alone undersells its launch cost: tree_triton, 1.4x faster than sdpa alone at batch 8 over
#: an 8192-token cache, made the whole forward 0.88x. Dense sdpa stays unless another is this much faster.
DECODE_MARGIN = 2.0


def margin_choice(timed: dict, default: str, margin: float) -> str:
    """The fastest of ``timed`` (ms), but ``default`` unless the fastest beats it by ``margin``.

    >>> margin_choice({"varlen": 2.0, "tree_triton": 1.9}, "varlen", 1.10)
    'varlen'
    >>> margin_choice({"varlen": 2.0, "tree_triton": 1.5}, "varlen", 1.10)
    'tree_triton'
    >>> margin_choice({"tree_triton": 1.0, "eager": 3.0}, "varlen", 1.10)   # default not measured
    'tree_triton'
    """
    best = min(timed, key=timed.get)
    if default in timed and timed[best] * margin > timed[default]:
        return default
    return best


def is_decode_layout(layout) -> bool:
    """A few new tokens over a KV cache (draft-tree verification), not a training row."""
    return getattr(layout, "past", 0) > 0 and layout.seq_len <= DECODE_MAX_QUERIES


def _nearest(entries: list, batch: int, past: int) -> dict:
    import math
    return min(entries, key=lambda e: abs(math.log2(max(e["batch"], 1) / max(batch, 1)))
               + abs(math.log2(max(e["past"], 1) / max(past, 1))))


def choose_tree_kernel(candidates, layout, q: torch.Tensor) -> tuple[str, dict]:
    """The kernel for a tree layout, from the cost table's measured tree rows when it has them.

    ``decode`` rows (``python -m packmask.backends.calibrate``): per head dim, measured ms of each
    kernel on draft-tree verification shapes (batch, cache length); the nearest shape's fastest
    candidate wins if it beats dense sdpa by :data:`DECODE_MARGIN`. Without them a decode call goes to
    ``sdpa`` with the dense mask (what a user would write). ``tree`` rows: measured fwd+bwd ms on
    shared-prefix training rows; another kernel replaces varlen when :data:`TREE_MARGIN` faster. Without
    them the first candidate other than ``tree_triton``, which ``auto`` takes only once it has been
    measured on this GPU (force it with ``packmask.backend("tree_triton")``).

    >>> from packmask.layout_tree import TreeLayout
    >>> draft = TreeLayout.from_parents(torch.tensor([[-1, 0, 0]]), past_length=100)
    >>> choose_tree_kernel(["varlen", "sdpa", "eager"], draft, torch.zeros(1, 2, 3, 64))[0]   # CPU: no table
    'sdpa'
    """
    decode = is_decode_layout(layout)
    # the one-launch tree kernel has been checked on CPU (Triton's interpreter) and compiled for sm_90, but
    # not yet timed or run on a GPU: ``auto`` takes it only where calibrate measured it on this GPU (its
    # timings prove it ran); until then it is opt-in, with packmask.backend("tree_triton")
    unmeasured = [c for c in candidates if c != "tree_triton"] or list(candidates)
    if torch.compiler.is_compiling():
        return unmeasured[0], {"reason": "static order under torch.compile"}
    name = _device_name(q)
    table = load_table(name) if name else None
    section = (table or {}).get("decode" if decode else "tree", {})
    dims = sorted(int(d) for d in section) if section else []
    if dims:
        d = str(min(dims, key=lambda x: (abs(x - q.shape[-1]), x)))
        rows = section[d]
        measured = _nearest(rows, layout.batch_size, layout.past)["ms"] if decode else rows
        timed = {c: measured[c] for c in candidates if measured.get(c) is not None}
        if timed:
            best = margin_choice(timed, "sdpa" if decode else "varlen", DECODE_MARGIN if decode else TREE_MARGIN)
            return best, {"reason": f"measured {'decode' if decode else 'tree'} rows of the cost table",
                          "measured_ms": timed, "source": table.get("source")}
    if decode and "sdpa" in candidates:
        return "sdpa", {"reason": "a few queries over a KV cache: the dense mask is cheapest without a measured "
                                  "decode table (python -m packmask.backends.calibrate)"}
    return unmeasured[0], {"reason": "tree layout without measured tree rows: the first candidate (tree_triton "
                                     "only when measured here or forced)"}
