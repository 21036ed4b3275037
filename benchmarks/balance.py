"""Per-rank balance of packed rows: packmask's BalancedBatchSampler against naive round-robin.

    python3 benchmarks/balance.py --out benchmarks/balance.json

CPU only (it measures the plan, not a GPU). Two length distributions, both packed with
``pack_lengths`` (best-fit decreasing) into rows of ``--max-length`` tokens, seed 0:

  sft       lognormal document lengths, median 400, sigma 1.0, clipped to [8, max_length]
  long-doc  lognormal, median 6000, sigma 1.0, clipped to [256, 4 * max_length], overflow="split"
            (long documents are cut into max_length pieces: rows of one 8k piece next to rows of
            many short documents -- the case where attention cost differs most)

For each distribution, rank count (8, 64) and rows per rank per micro-step (``--batch-sizes``),
one epoch of micro-steps is planned by ``BalancedBatchSampler`` and by round-robin over the same
shuffled rows (what ``DistributedSampler`` does). Per step, each rank's load is the sum over its rows
of tokens and of causal attention pairs ``sum L(L+1)/2``; reported are ``max/mean`` over ranks,
worst step and mean over steps, and "epoch": sum over steps of the slowest rank / sum of the mean
(what a synchronous run waits for). Goals: attention worst ``<= 1.05``, tokens worst ``<= 1.02``.
Exits nonzero if the sampler loses or duplicates a row (correctness check).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from packmask.data.packing import pack_lengths  # noqa: E402
from packmask.distributed.sampler import (BalancedBatchSampler, balance_report, round_robin_steps,  # noqa: E402
                                          row_costs)
from _report import write_json  # noqa: E402

GOAL_ATTENTION, GOAL_TOKENS = 1.05, 1.02


def document_lengths(kind: str, n: int, max_length: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "sft":
        return np.clip(np.exp(rng.normal(math.log(400), 1.0, n)), 8, max_length).astype(np.int64)
    return np.clip(np.exp(rng.normal(math.log(6000), 1.0, n)), 256, 4 * max_length).astype(np.int64)


def packed_rows(kind: str, rows_wanted: int, max_length: int):
    mean_doc = 400 * math.exp(0.5) if kind == "sft" else 6000 * math.exp(0.5)
    n = int(rows_wanted * max_length / min(mean_doc, max_length) * 1.05) + 1
    assignment = pack_lengths(document_lengths(kind, n, max_length), max_length,
                              overflow="split" if kind == "long-doc" else "truncate")
    lengths, offsets = assignment.length, assignment.row_offsets
    import pyarrow as pa
    column = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(lengths))
    return column, assignment


def check_partition(steps: np.ndarray, num_rows: int) -> None:
    flat = steps.reshape(-1)
    if np.unique(flat).size != flat.size or flat.min() < 0 or flat.max() >= num_rows:
        raise SystemExit("FAIL: the sampler repeated a row or produced an index outside the dataset")


def run_case(kind, column, world_size, batch_size, window_steps, seed):
    tokens, attention = row_costs(column)
    begin = time.perf_counter()
    sampler = BalancedBatchSampler(column, batch_size, world_size=world_size, rank=None, seed=seed,
                                   window_steps=window_steps)
    steps = sampler.steps()
    plan_seconds = time.perf_counter() - begin
    check_partition(steps, tokens.size)
    baseline = round_robin_steps(tokens.size, world_size, batch_size, seed=seed)
    return dict(distribution=kind, world_size=world_size, batch_size=batch_size, window_steps=window_steps,
                rows=int(tokens.size), plan_seconds=plan_seconds,
                balanced=balance_report(steps, tokens, attention),
                round_robin=balance_report(baseline, tokens, attention),
                row_attention_max_over_mean=float(attention.max() / attention.mean()),
                row_tokens_min_over_mean=float(tokens.min() / tokens.mean()))


def table(results):
    from rich.table import Table
    t = Table(title="per-rank load per micro-step, max/mean over ranks (worst step | mean over steps)")
    for col in ("distribution", "ranks", "rows/rank", "window", "attention balanced", "attention round-robin",
                "tokens balanced", "tokens round-robin", "attention epoch bal. | r-r", "plan s"):
        t.add_column(col, justify="right")
    for r in results:
        b, n = r["balanced"], r["round_robin"]
        epoch = r["window_steps"] * r["world_size"] * r["batch_size"] >= r["rows"]
        t.add_row(r["distribution"], str(r["world_size"]), str(r["batch_size"]),
                  "epoch" if epoch else str(r["window_steps"]),
                  f"{b['attention_max_over_mean_worst']:.3f} | {b['attention_max_over_mean_avg']:.3f}",
                  f"{n['attention_max_over_mean_worst']:.3f} | {n['attention_max_over_mean_avg']:.3f}",
                  f"{b['tokens_max_over_mean_worst']:.3f} | {b['tokens_max_over_mean_avg']:.3f}",
                  f"{n['tokens_max_over_mean_worst']:.3f} | {n['tokens_max_over_mean_avg']:.3f}",
                  f"{b['attention_epoch_slowest_over_mean']:.3f} | {n['attention_epoch_slowest_over_mean']:.3f}",
                  f"{r['plan_seconds']:.2f}")
    return t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-length", type=int, default=8192)
    p.add_argument("--rows", type=int, default=32768, help="packed rows per distribution (about)")
    p.add_argument("--world-sizes", type=int, nargs="+", default=[8, 64])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    p.add_argument("--window-steps", type=int, nargs="+", default=[64, 1_000_000])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/balance.json")
    args = p.parse_args(argv)

    results = []
    for kind in ("sft", "long-doc"):
        column, _ = packed_rows(kind, args.rows, args.max_length)
        for world_size in args.world_sizes:
            for batch_size in args.batch_sizes:
                for window in args.window_steps:
                    steps_in_epoch = len(column) // (world_size * batch_size)
                    if window > steps_in_epoch and any(min(w, steps_in_epoch) == steps_in_epoch
                                                       for w in args.window_steps if w < window):
                        continue  # a smaller window already covered the epoch
                    results.append(run_case(kind, column, world_size, batch_size, window, args.seed))
    from rich.console import Console
    Console(width=200).print(table(results))
    meets = [r for r in results if r["balanced"]["attention_max_over_mean_worst"] <= GOAL_ATTENTION
             and r["balanced"]["tokens_max_over_mean_worst"] <= GOAL_TOKENS]
    print(f"goals (attention <= {GOAL_ATTENTION}, tokens <= {GOAL_TOKENS}, worst step): "
          f"{len(meets)} of {len(results)} cases met")
    import numba
    import torch
    record = dict(results=results, goals=dict(attention=GOAL_ATTENTION, tokens=GOAL_TOKENS),
                  args=vars(args), date=datetime.date.today().isoformat(), machine=platform.processor() or platform.machine(),
                  cpus=os.cpu_count(), python=platform.python_version(), numpy=np.__version__,
                  numba=numba.__version__, torch=torch.__version__)
    write_json(args.out, record)


if __name__ == "__main__":
    main()
