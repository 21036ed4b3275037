"""Packing speed and fill: packmask against TRL's ``pack_dataset(strategy="bfd")`` in the same run.

    python3 benchmarks/packing.py --out benchmarks/packing.json
    python3 benchmarks/packing.py --first-call-only --out benchmarks/packing_first_call.json

Data mirrors ``/work/shared/anchors/packing_anchor.py``: lognormal lengths (median 400, sigma 1.0,
clipped to [8, 8192]), random int32 token ids, one Arrow list column, rows of 8192, seed 0.

Cases
  sft      200k documents; TRL bfd with its default per-1000-row map batches and with one global
           batch, packmask bfd / ffd / sequential on the same Dataset.
  hard     lengths clustered just above max_length/3 and max_length/2 (50k documents): the case where
           greedy packers pair badly. TRL global bfd beside packmask.
  10M      10M documents, lengths only (``pack_lengths``; the token data would be 6.6G tokens, 26 GB of
           int32 -- more than this machine's memory), plus a full ``pack_dataset`` on a scaled Dataset
           (``--scaled-docs``, default 1M) whose time is reported as measured, with a linear
           extrapolation to 10M marked as such.

First call (run first; ``--first-call-only`` stops after it): a fresh Python process imports packmask,
builds the 200k-document Dataset, then times its first ``packmask.pack_dataset`` call (the lazy import
of the packing modules and numba, and loading the cached kernels, fall inside it), ``--repeats`` warm
calls, and TRL's ``pack_dataset(strategy="bfd")`` on the same Dataset with its default map batches and
with one global batch. A second fresh process does the same with an empty numba cache (the very first
run after an install compiles the kernels). Wall and process CPU time are both recorded: on a machine
shared with other jobs CPU time moves less between runs.

packmask times in the cases are the median of ``--repeats`` calls, each freeing the previous output
first, and the first of them ("first call" there: the kernels are already loaded) is listed too. TRL
runs once per setting (each takes seconds).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import write_json  # noqa: E402


def sft_lengths(n: int, max_length: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.exp(rng.normal(math.log(400), 1.0, n)), 8, max_length).astype(np.int64)


def hard_lengths(n: int, max_length: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    width = max(1, max_length // 64)
    third = max_length // 3 + 1 + rng.integers(0, width, n)
    half = max_length // 2 + 1 + rng.integers(0, width, n)
    return np.where(rng.random(n) < 0.5, third, half).astype(np.int64)


def make_dataset(lengths: np.ndarray, seed: int = 0):
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    from packmask.data.spans import offsets_from_lengths

    offsets = offsets_from_lengths(lengths)
    values = rng.integers(0, 32000, int(offsets[-1]), dtype=np.int32)
    offset_type = pa.int32() if offsets[-1] < 2**31 else pa.int64()
    cls = pa.ListArray if offset_type == pa.int32() else pa.LargeListArray
    column = cls.from_arrays(pa.array(offsets, type=offset_type), pa.array(values))
    return Dataset(pa.table({"input_ids": column}))


def timed(fn, repeats: int):
    """Median and all wall times of ``repeats`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        result = None  # free the previous output first, as a program calling once would have it freed
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result, times


def first_call(docs: int, max_length: int, empty_cache: bool, with_trl: bool, repeats: int) -> dict:
    """The first ``packmask.pack_dataset`` call of a fresh process on ``docs`` lognormal documents, the
    warm calls after it, and TRL's ``pack_dataset(strategy="bfd")`` on the same Dataset in the same
    process. ``import packmask`` and building the Dataset come before the clock starts (a program
    has both before it packs); the lazy import of the packing modules and numba, and loading (or,
    with ``empty_cache``, compiling) the kernels, are inside the first call."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = textwrap.dedent(f"""
        import json, statistics, sys, time
        sys.path[:0] = [{here!r}, {os.path.join(here, "..", "src")!r}]
        from packing import make_dataset, sft_lengths
        import datasets
        import packmask
        datasets.disable_progress_bars()
        ds = make_dataset(sft_lengths({docs}, {max_length}))
        c, t = time.process_time(), time.perf_counter()
        out = packmask.pack_dataset(ds, {max_length})
        first, first_cpu = time.perf_counter() - t, time.process_time() - c
        rows = len(out)
        warm = []
        for _ in range({repeats}):
            out = None
            t = time.perf_counter(); out = packmask.pack_dataset(ds, {max_length}); warm.append(time.perf_counter() - t)
        result = dict(first_call_s=first, first_call_cpu_s=first_cpu, warm_s=statistics.median(warm), warm_all_s=warm,
                      rows=rows)
        if {with_trl}:
            from trl import pack_dataset as trl_pack_dataset
            for name, kwargs in (("trl_default_s", {{}}), ("trl_global_s", dict(map_kwargs=dict(batch_size=None)))):
                out = None
                c, t = time.process_time(), time.perf_counter()
                out = trl_pack_dataset(ds, {max_length}, strategy="bfd", **kwargs)
                result[name], result[name[:-2] + "_cpu_s"] = time.perf_counter() - t, time.process_time() - c
            result["trl_rows"] = len(out)
        print(json.dumps(result))
    """)
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as cache:
        if empty_cache:
            env["NUMBA_CACHE_DIR"] = cache
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"first-call subprocess failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for trl in ("trl_default_s", "trl_global_s"):
        if trl in result:
            result[f"first_call_speedup_vs_{trl[:-2]}"] = result[trl] / result["first_call_s"]
            result[f"first_call_cpu_speedup_vs_{trl[:-2]}"] = result[trl[:-2] + "_cpu_s"] / result["first_call_cpu_s"]
            result[f"warm_speedup_vs_{trl[:-2]}"] = result[trl] / result["warm_s"]
    return dict(numba_cache="empty (JIT compile)" if empty_cache else "filled", docs=docs, **result)


def first_call_table(records: list[dict], title: str):
    from rich.table import Table

    table = Table(title=title)
    for col in ("numba cache", "first call s (CPU s)", "warm s", "TRL bfd s (default / global batch)",
                "first call vs TRL (default / global)", "same in CPU time", "warm vs TRL (default / global)"):
        table.add_column(col, justify="left" if col == "numba cache" else "right")
    for r in records:
        trl = (f"{r['trl_default_s']:.2f} / {r['trl_global_s']:.2f}" if "trl_default_s" in r else "–")
        ratio = lambda kind: (f"{r[f'{kind}_speedup_vs_trl_default']:.1f}x / {r[f'{kind}_speedup_vs_trl_global']:.1f}x"  # noqa: E731
                              if f"{kind}_speedup_vs_trl_default" in r else "–")
        table.add_row(r["numba_cache"], f"{r['first_call_s']:.3f} ({r['first_call_cpu_s']:.3f})", f"{r['warm_s']:.3f}",
                      trl, ratio("first_call"), ratio("first_call_cpu"), ratio("warm"))
    return table


def trl_pack(ds, max_length: int, batch_size):
    from trl import pack_dataset as trl_pack_dataset

    t = time.perf_counter()
    out = trl_pack_dataset(ds, max_length, strategy="bfd", map_kwargs=dict(batch_size=batch_size))
    seconds = time.perf_counter() - t
    rows = len(out)
    tokens = int(sum(pa.compute.list_value_length(out.data.table.column("input_ids")).to_numpy()))
    return dict(rows=rows, tokens=tokens, fill=tokens / (rows * max_length), seconds=seconds)


def packmask_pack(ds, max_length: int, strategy: str, repeats: int):
    from packmask.data.packing import pack_dataset

    seconds, (out, stats), times = timed(
        lambda: pack_dataset(ds, max_length, strategy=strategy, return_stats=True), repeats)
    assert sum(pa.compute.list_value_length(out.data.table.column("input_ids")).to_numpy()) == stats.tokens
    return dict(rows=stats.rows, tokens=stats.tokens, fill=stats.fill, seconds=seconds, first_call_s=times[0],
                all_seconds=times, truncated=stats.truncated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--hard-docs", type=int, default=50_000)
    parser.add_argument("--big-docs", type=int, default=10_000_000)
    parser.add_argument("--scaled-docs", type=int, default=1_000_000)
    parser.add_argument("--max-length", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--first-call-only", action="store_true",
                        help="only the fresh-process first call (and warm calls, and TRL) on --docs documents")
    parser.add_argument("--out", default=None, help="write results as JSON here")
    args = parser.parse_args()
    L = args.max_length

    from rich.console import Console
    from rich.table import Table

    import datasets
    import numba
    from packmask.data.packing import pack_dataset, pack_lengths

    console = Console(width=160)
    datasets.disable_progress_bars()
    results: dict = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "max_length": L, "cases": []}
    cpu = "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name"))
    except Exception:
        pass
    versions = dict(python=platform.python_version(), numpy=np.__version__, numba=numba.__version__,
                    pyarrow=pa.__version__, datasets=datasets.__version__)
    try:
        import trl
        versions["trl"] = trl.__version__
    except ImportError:
        args.no_trl = True
    results.update(cpu=cpu, cores=os.cpu_count(), versions=versions,
                   load_average_at_start=os.getloadavg() if hasattr(os, "getloadavg") else None)
    console.print(f"[bold]device[/] {cpu}, {os.cpu_count()} cores; versions {versions}")

    # the issue-22 goal: a fresh process's first pack_dataset call >= 10x TRL's bfd on 200k documents
    results["first_call"] = [first_call(args.docs, L, empty_cache=False, with_trl=not args.no_trl, repeats=args.repeats),
                             first_call(args.docs, L, empty_cache=True, with_trl=False, repeats=1)]
    console.print(first_call_table(results["first_call"], f"First pack_dataset call in a fresh process, {args.docs:,} "
                                                          f"documents, rows of {L} ({cpu}, {os.cpu_count()} cores)"))
    if args.first_call_only:
        if args.out:
            write_json(args.out, results)
        return

    bounds = {}

    def add(case, who, strategy, r):
        r = dict(case=case, packer=who, strategy=strategy, **r)
        r["lower_bound"] = max(math.ceil(r["tokens"] / L), bounds.get(case, 0))
        results["cases"].append(r)
        console.print(r)

    for case, lengths in (("sft", sft_lengths(args.docs, L)), ("hard", hard_lengths(args.hard_docs, L))):
        # Besides ceil(tokens / L): two documents longer than L/2 never share a row, and a row holds at
        # most two documents longer than L/3 -- the bound that binds on the hard distribution.
        bounds[case] = max(int((lengths > L / 2).sum()), math.ceil(int((lengths > L / 3).sum()) / 2))
        ds = make_dataset(lengths)
        # load the numba cache and start its thread pool outside the timings (reported above as
        # "first call: cache load"); the "first call" column is then the first call on this data
        pack_dataset(make_dataset(lengths[:10]), L)
        for strategy in ("bfd", "ffd", "sequential"):
            add(case, "packmask", strategy, packmask_pack(ds, L, strategy, args.repeats))
        if not args.no_trl:
            batches = (1000, None) if case == "sft" else (None,)
            for bs in batches:
                add(case, "trl", f"bfd, map batch {bs or 'global'}", trl_pack(ds, L, bs))
        del ds

    big = sft_lengths(args.big_docs, L, seed=1)
    for strategy in ("bfd", "ffd", "sequential"):
        seconds, a, times = timed(lambda: pack_lengths(big, L, strategy=strategy), args.repeats)
        add(f"{args.big_docs // 1_000_000}M lengths", "packmask", strategy,
            dict(rows=a.stats.rows, tokens=a.stats.tokens, fill=a.stats.fill, seconds=seconds, first_call_s=times[0],
                 all_seconds=times))
    ds = make_dataset(sft_lengths(args.scaled_docs, L, seed=2))
    r = packmask_pack(ds, L, "bfd", 1)
    r["extrapolated_10M_s"] = r["seconds"] * args.big_docs / args.scaled_docs
    add(f"{args.scaled_docs / 1e6:g}M dataset", "packmask", "bfd", r)
    del ds

    table = Table(title=f"Packing, rows of {L} tokens ({cpu}, {os.cpu_count()} cores)")
    for col in ("case", "packer", "strategy", "rows", "lower bound", "fill", "seconds (median)", "first call",
                "speedup vs TRL global"):
        table.add_column(col, justify="right" if col not in ("case", "packer", "strategy") else "left")
    trl_global = {r["case"]: r["seconds"] for r in results["cases"] if r["packer"] == "trl" and "global" in r["strategy"]}
    for r in results["cases"]:
        ref = trl_global.get(r["case"])
        if ref is not None and r["packer"] == "packmask":
            r["speedup_vs_trl_global"] = ref / r["seconds"]
            r["speedup_first_call_vs_trl_global"] = ref / r["first_call_s"]
        table.add_row(r["case"], r["packer"], r["strategy"], f"{r['rows']:,}", f"{r['lower_bound']:,}",
                      f"{r['fill']:.4f}", f"{r['seconds']:.3f}",
                      f"{r['first_call_s']:.3f}" if "first_call_s" in r else "",
                      f"{r['speedup_vs_trl_global']:.1f}x (first call {r['speedup_first_call_vs_trl_global']:.1f}x)"
                      if "speedup_vs_trl_global" in r else "")
    console.print(table)
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
