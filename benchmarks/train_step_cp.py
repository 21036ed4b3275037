"""Context-parallel train step: a long packed row over N GPUs vs a shorter row on one GPU.

Run with torchrun on one host (NVLink SHARP off, as everywhere in packmask's multi-GPU runs)::

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 2 benchmarks/train_step_cp.py --row 131072
    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 4 benchmarks/train_step_cp.py --row 262144
    torchrun --standalone --nproc-per-node 2 benchmarks/train_step_cp.py --smoke      # CPU, gloo, seconds

Three phases, every one timed as forward + backward + a plain SGD update (no optimizer state) of a
random-init Llama-shaped model (bf16, gradient checkpointing, ``attn_implementation="packmask"``):

1. **agreement** — a ``--check-row``-token row on all ranks with context parallelism vs the same
   row on rank 0 alone, with a ``--check-layers`` model: logits and every gradient. Both are
   compared to an fp32 single-GPU run; the CP run must be no less accurate than the single-GPU
   bf16 run (error <= 2x its error + 1e-3). Fails the script (exit 1) otherwise.
2. **single** — rank 0 alone trains a ``--single-row`` (65,536) token row: tokens/s, peak memory;
   then tries the full ``--row`` on one GPU and records whether it runs out of memory.
3. **cp** — all ranks train the ``--row`` row with context parallelism: per-GPU tokens/s
   (row / N / step time), peak memory (max over ranks), and the ratio to phase 2's tokens/s. The
   row is sharded once before timing (host planning, recorded as ``shard_s``: a data loader
   would do it ahead of the step).

Documents follow the "long" distribution of benchmarks/cp_balance.py (log-normal, median 8,000
tokens). Prints a table and writes ``train_step_cp.json`` to $OUT (or the current directory).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from packmask import segments
from packmask.distributed.context_parallel import ContextParallel
from packmask.testing import rel_err, tiny_config
from _report import write_json  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def row_lengths(N: int, seed: int, median: int = 8_000, sigma: float = 1.0) -> list[int]:
    """Documents of a log-normal length filling one row of N tokens (the last one cut to fit)."""
    g = torch.Generator().manual_seed(seed)
    lengths, left = [], N
    while left:
        L = int(min(max(256, math.exp(torch.randn(1, generator=g).item() * sigma + math.log(median))), left))
        lengths.append(min(L, left))
        left -= lengths[-1]
    return lengths


def make_batch(N: int, vocab: int, seed: int, median: int) -> dict:
    lengths = row_lengths(N, seed, median)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, N), generator=g)
    labels = ids.clone()
    labels[segments.starts_from_lengths([lengths], N)] = -100   # each document's first token has no predictor
    return dict(input_ids=ids.to(DEV), labels=labels.to(DEV), seq_lengths=[lengths])


def build_model(args, layers: int, dtype, collective: bool = False):
    if args.smoke:
        config = tiny_config("llama", num_hidden_layers=layers)
    else:
        config = tiny_config("llama", hidden_size=args.hidden, intermediate_size=args.intermediate,
                             num_hidden_layers=layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                             vocab_size=args.vocab, max_position_embeddings=max(args.row, 8192))
    torch.manual_seed(0)
    with torch.device(DEV):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="packmask", dtype=dtype)
    if collective:  # identical weights on every rank (every rank must be building it)
        for p in model.parameters():
            dist.broadcast(p.data, 0)
    if args.checkpointing and not args.smoke:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def sgd_step(model, lr=1e-6):
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)
                p.grad = None


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed_steps(step, warmup: int, steps: int, collective: bool = False) -> float:
    for _ in range(warmup):
        step()
    sync()
    if collective:
        dist.barrier()
    begin = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - begin) / steps


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2 ** 30 if DEV == "cuda" else None


def reset_peak():
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def agreement(args, ctx, rank) -> dict:
    """CP (bf16) vs one GPU (bf16), both vs one GPU in fp32, on a row that fits one GPU."""
    batch = make_batch(args.check_row, args.vocab if not args.smoke else 128, 1, args.median)
    low = torch.float32 if args.smoke else torch.bfloat16
    model = build_model(args, args.check_layers, low, collective=True)
    with ctx:
        local = ctx.shard(batch)
        out = model(**local)
        out.loss.backward()
        ctx.all_reduce_gradients(model)
        cp_logits = ctx.gather(out.logits.detach()).float()
    cp_grads = {n: p.grad.float() for n, p in model.named_parameters()}
    result = {}
    if rank == 0:
        runs = {}
        for name, dtype in (("single", low), ("fp32", torch.float32)):
            ref = build_model(args, args.check_layers, dtype) if dtype != low else model
            ref.zero_grad(set_to_none=True)
            o = ref(**batch, use_cache=False)
            o.loss.backward()
            runs[name] = (o.logits.detach().float(), {n: p.grad.float() for n, p in ref.named_parameters()})
            if ref is not model:
                del ref
        (s_logits, s_grads), (f_logits, f_grads) = runs["single"], runs["fp32"]
        result = dict(row=args.check_row, layers=args.check_layers, dtype=str(low),
                      logits_cp=rel_err(cp_logits, f_logits), logits_single=rel_err(s_logits, f_logits),
                      grads_cp=max(rel_err(cp_grads[n], g) for n, g in f_grads.items()),
                      grads_single=max(rel_err(s_grads[n], g) for n, g in f_grads.items()))
        tol = (lambda single: 1e-5) if args.smoke else (lambda single: 2 * single + 1e-3)
        result["ok"] = (result["logits_cp"] <= tol(result["logits_single"])
                        and result["grads_cp"] <= tol(result["grads_single"]))
    del model
    reset_peak()
    return result


def single_gpu(args) -> dict:
    """Rank 0 alone: the --single-row row, then an attempt at the full --row."""
    result = {}
    for key, N in (("single", args.single_row), ("single_full_row", args.row)):
        model = build_model(args, args.layers, torch.float32 if args.smoke else torch.bfloat16)
        batch = make_batch(N, model.config.vocab_size, 2, args.median)
        reset_peak()

        def step():
            model(**batch, use_cache=False).loss.backward()
            sgd_step(model)
        try:
            seconds = timed_steps(step, args.warmup, args.steps)
            result[key] = dict(row=N, step_s=round(seconds, 4), tokens_per_s=round(N / seconds, 1),
                               peak_gib=peak_gib(), oom=False)
        except torch.cuda.OutOfMemoryError:
            result[key] = dict(row=N, oom=True)
        del model, batch
        reset_peak()
    return result


def context_parallel_run(args, ctx, world) -> dict:
    model = build_model(args, args.layers, torch.float32 if args.smoke else torch.bfloat16, collective=True)
    batch = make_batch(args.row, model.config.vocab_size, 2, args.median)
    reset_peak()

    begin = time.perf_counter()
    local = ctx.shard(batch)  # host planning; a data loader would do it ahead of the step
    shard_s = time.perf_counter() - begin

    def step():
        with ctx:
            model(**local).loss.backward()
        ctx.all_reduce_gradients(model)
        sgd_step(model)
    seconds = timed_steps(step, args.warmup, args.steps, collective=True)
    peak = torch.tensor([peak_gib() or 0.0], device=DEV)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return dict(row=args.row, gpus=world, step_s=round(seconds, 4), shard_s=round(shard_s, 4),
                tokens_per_s_per_gpu=round(args.row / world / seconds, 1),
                peak_gib_max_rank=peak.item() if DEV == "cuda" else None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--row", type=int, default=131_072)
    p.add_argument("--single-row", type=int, default=65_536)
    p.add_argument("--check-row", type=int, default=16_384)
    p.add_argument("--check-layers", type=int, default=2)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32_000)
    p.add_argument("--median", type=int, default=8_000, help="median document length")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--smoke", action="store_true", help="CPU gloo, tiny model and rows: checks the script runs")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    if args.smoke:
        global DEV
        DEV = "cpu"
        args.row, args.single_row, args.check_row, args.layers, args.median = 512, 256, 128, 2, 40
        args.warmup, args.steps = 1, 2
    # rank 0 runs the one-GPU phase while the others wait: a long timeout
    dist.init_process_group("nccl" if DEV == "cuda" else "gloo", timeout=datetime.timedelta(minutes=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    if DEV == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    ctx = ContextParallel(None)
    record = dict(script="benchmarks/train_step_cp.py", args=vars(args), world=world, torch=torch.__version__,
                  device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"))
    record["agreement"] = agreement(args, ctx, rank)
    if rank == 0:
        record.update(single_gpu(args))
    dist.barrier()
    record["cp"] = context_parallel_run(args, ctx, world)
    ok = True
    if rank == 0:
        single = record["single"]
        if not single.get("oom"):
            record["cp"]["per_gpu_vs_single"] = round(record["cp"]["tokens_per_s_per_gpu"] / single["tokens_per_s"], 3)
        a = record["agreement"]
        ok = a["ok"]
        print(f"agreement ({a['dtype']}, {a['row']} tokens): logits rel err CP {a['logits_cp']:.2e} vs one GPU "
              f"{a['logits_single']:.2e}; worst gradient CP {a['grads_cp']:.2e} vs one GPU {a['grads_single']:.2e} "
              f"-> {'ok' if ok else 'FAILED'}")
        print(f"{'run':<28} {'row':>9} {'GPUs':>4} {'tokens/s/GPU':>13} {'peak GiB':>9}")
        for name, r, g in (("one GPU", single, 1), ("one GPU, full row", record["single_full_row"], 1),
                           ("context parallel", record["cp"], world)):
            if r.get("oom"):
                print(f"{name:<28} {r['row']:>9,} {g:>4} {'out of memory':>13}")
                continue
            tps = r.get("tokens_per_s_per_gpu", r.get("tokens_per_s"))
            peak = r.get("peak_gib_max_rank", r.get("peak_gib"))
            print(f"{name:<28} {r['row']:>9,} {g:>4} {tps:>13,.0f} {peak if peak is None else round(peak, 1)!s:>9}")
        if "per_gpu_vs_single" in record["cp"]:
            print(f"per-GPU throughput, context parallel / one GPU: {record['cp']['per_gpu_vs_single']:.2f} (goal >= 0.8)")
        write_json(os.path.join(args.out, "train_step_cp.json"), record)
    flag = torch.tensor([0 if ok else 1], device=DEV)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    dist.destroy_process_group()
    return int(flag.item())


if __name__ == "__main__":
    code = main()
    # results are written and the group is gone: skip interpreter teardown, where a C++ thread of the
    # runtime occasionally aborts the process ("terminate called without an active exception") after
    # the work succeeded
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
