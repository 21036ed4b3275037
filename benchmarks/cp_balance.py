"""Context-parallel balance: attention work per rank for packed rows split over CP = 2, 4, 8 ranks.

CPU only (the plan is host arithmetic). For three document-length distributions, packs documents
into rows (packmask.pack_lengths, best-fit decreasing; documents longer than a row are split into
row-sized pieces), plans every row with packmask's ``balanced`` split, the per-document ``zigzag``
split and a ``prefix`` split (contiguous slices of the row, the naive baseline), and reports
max / mean attention work per rank, work = (query, key) pairs under causal attention.

Goal (issue 14): max / mean <= 1.1 for the balanced split. Correctness check inside: every plan
must hand every token to exactly one rank and the same number of tokens to every rank (exit 1
otherwise). Prints a table and writes ``cp_balance.json`` (to $OUT or the current directory).

    python3 benchmarks/cp_balance.py [--rows 32] [--out DIR]
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time

import torch

from packmask.data.packing import pack_lengths
from packmask.distributed.cp_plan import plan_context_parallel
from packmask.layout import DocumentLayout
from packmask.segments import cu_seqlens_from_lengths
from _report import write_json  # noqa: E402

#: name -> (median document length, log-normal sigma, min, max, row length)
DISTRIBUTIONS = {
    "sft": (400, 1.0, 16, 16_384, 32_768),
    "long": (8_000, 1.0, 256, 131_072, 131_072),
    "book": (100_000, 0.8, 16_384, 1_000_000, 262_144),
}
CPS = (2, 4, 8)
STRATEGIES = ("balanced", "zigzag", "prefix")
GOAL = 1.1


def document_lengths(name: str, tokens: int, seed: int = 0) -> list[int]:
    median, sigma, lo, hi, _ = DISTRIBUTIONS[name]
    g = torch.Generator().manual_seed(seed)
    count = max(16, int(3 * tokens / median))
    lengths = torch.exp(torch.randn(count, generator=g) * sigma + math.log(median)).clamp(lo, hi).long()
    keep = cu_seqlens_from_lengths(lengths)[1:] <= tokens   # the documents that end within the budget
    return lengths[keep].tolist()


def packed_rows(name: str, rows: int) -> tuple[list[list[int]], int]:
    N = DISTRIBUTIONS[name][4]
    assignment = pack_lengths(document_lengths(name, int(rows * N * 1.05)), N, overflow="split")
    full = sorted(assignment.seq_lengths(), key=lambda r: -sum(r))[:rows]  # the fullest rows
    return full, N


def check_plan(plan, N: int, cp: int) -> None:
    for b in range(plan.batch_size):
        seen = torch.sort(plan.index[:, b].reshape(-1)).values
        if not torch.equal(seen, torch.arange(N)) or plan.index.shape[-1] * cp != N:
            raise SystemExit(f"plan error: row {b} is not split into {cp} equal parts covering every token once")


def piece_stats(plan) -> tuple[float, float]:
    """Mean contiguous chunks per rank and row (more, smaller chunks = less efficient kernels), and
    the keys each rank's varlen call reads (each chunk reads its document from the start up to the
    chunk's end, copied into one packed key tensor) as a fraction of the row."""
    chunks = sum(len(row) for row in plan.chunks)
    keys = sum(int(plan.position_ids[b, s]) + length for b, row in enumerate(plan.chunks) for _, s, length in row)
    per_rank_row = plan.batch_size * plan.cp
    return chunks / per_rank_row, keys / (per_rank_row * plan.seq_len)


def measure(rows_per_dist: int) -> list[dict]:
    results = []
    for name in DISTRIBUTIONS:
        rows, N = packed_rows(name, rows_per_dist)
        layout = DocumentLayout.from_seq_lengths(rows, N)
        docs = [len(r) for r in rows]
        for cp in CPS:
            entry = dict(distribution=name, row_tokens=N, rows=len(rows), cp=cp,
                         docs_per_row=round(sum(docs) / len(docs), 1),
                         fill=round(sum(map(sum, rows)) / (len(rows) * N), 4))
            for strategy in STRATEGIES:
                begin = time.perf_counter()
                plan = plan_context_parallel(layout, cp, strategy=strategy)
                seconds = time.perf_counter() - begin
                check_plan(plan, N, cp)
                if strategy != "prefix":  # (a prefix slice spans documents: no per-document chunks)
                    pieces, keys = piece_stats(plan)
                    entry[strategy + "_chunks"] = dict(per_rank=round(pieces, 1), varlen_keys_per_rank_over_row=round(keys, 3))
                costs = plan.rank_costs().double()
                ratio = costs.max(1).values / costs.mean(1)
                entry[strategy] = dict(mean_ratio=round(ratio.mean().item(), 4), worst_ratio=round(ratio.max().item(), 4),
                                       plan_ms_per_row=round(1000 * seconds / len(rows), 2))
            results.append(entry)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32, help="packed rows per distribution")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    results = measure(args.rows)
    header = f"{'distribution':<12} {'row':>8} {'docs/row':>8} {'CP':>3}  " + "  ".join(
        f"{s + ' mean/worst':>22}" for s in STRATEGIES)
    print("max / mean attention work per rank (1.0 = perfect; goal for balanced <= 1.1)")
    print(header)
    print("-" * len(header))
    for e in results:
        cells = "  ".join(f"{e[s]['mean_ratio']:>11.3f} / {e[s]['worst_ratio']:<8.3f}" for s in STRATEGIES)
        print(f"{e['distribution']:<12} {e['row_tokens']:>8,} {e['docs_per_row']:>8} {e['cp']:>3}  {cells}")
    worst = max(e["balanced"]["worst_ratio"] for e in results)
    met = worst <= GOAL
    print("chunks per rank and row (balanced / zigzag): " + ", ".join(
        f"{e['distribution']} cp{e['cp']} {e['balanced_chunks']['per_rank']}/{e['zigzag_chunks']['per_rank']}" for e in results))
    print(f"balanced split, worst row over all: {worst:.3f} ({'meets' if met else 'misses'} the {GOAL} goal)")
    record = dict(script="benchmarks/cp_balance.py", goal=GOAL, goal_met=met, results=results,
                  machine=platform.processor() or platform.machine(), python=platform.python_version(),
                  torch=torch.__version__, date=datetime.date.today().isoformat())
    write_json(os.path.join(args.out, "cp_balance.json"), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
