"""Data-parallel packed training on N GPUs: DDP and FSDP2, balanced rows vs round-robin.

    torchrun --nproc-per-node N benchmarks/train_step_ddp.py --out benchmarks/train_step_ddp.json
    torchrun --nproc-per-node 2 benchmarks/train_step_ddp.py --smoke --out /tmp/smoke.json   # CPU, gloo

GPU: TinyLlama-shaped Llama (hidden 2048, 8 layers, 32 heads / 4 kv heads, vocab 32000), bf16,
``attn_implementation="packmask"`` (varlen kernel), AdamW. Documents: lognormal SFT lengths (median
400, sigma 1.0, clipped to [8, row]) packed best-fit-decreasing into rows of ``--row`` tokens;
``--batch`` rows per GPU per step. The loss is ``packed_causal_lm_loss`` divided by the global
token count (``count_loss_items``, one all-reduce) times the world size.

For each wrapper (DDP, FSDP2 ``fully_shard`` per decoder layer) and each sampler
(``BalancedBatchSampler``, round-robin over the same shuffled rows):

* real tokens / s per GPU: non-padding tokens of all ranks / wall time of the timed steps / N;
* step-time max/mean across ranks: each step's forward + backward timed on every rank *without*
  gradient communication (DDP ``no_sync``; a probe pass on the same micro-batches before the timed
  run), max over ranks / mean over ranks, averaged over steps -- the time the fastest ranks wait.

Prints a table and writes JSON (rank 0). Exits nonzero if a loss is not finite or the all-reduced
token count differs from the count of the planned rows.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import packmask  # noqa: E402,F401  (registers attn_implementation="packmask")
from packmask.data.collator import PackedCollator  # noqa: E402
from packmask.data.loss import packed_causal_lm_loss  # noqa: E402
from packmask.data.packing import pack_lengths  # noqa: E402
from packmask.distributed import BalancedBatchSampler, count_loss_items, round_robin_steps  # noqa: E402
from _report import write_json  # noqa: E402


def make_rows(n_rows: int, row: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    median = 400 * row / 8192  # the SFT shape, scaled with the row (smoke rows are short)
    n_docs = int(n_rows * row / (median * math.exp(0.5)) * 1.2) + 8
    lengths = np.clip(np.exp(rng.normal(math.log(median), 1.0, n_docs)), 8, row).astype(np.int64)
    a = pack_lengths(lengths, row)
    seq_lengths = a.seq_lengths()[:n_rows]
    return [{"input_ids": rng.integers(0, vocab, sum(s)).tolist(), "seq_lengths": s} for s in seq_lengths]


def make_model(smoke: bool, device, dtype, row: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=512 if smoke else 32000, hidden_size=64 if smoke else 2048,
                      intermediate_size=128 if smoke else 5632, num_hidden_layers=2 if smoke else 8,
                      num_attention_heads=4 if smoke else 32, num_key_value_heads=2 if smoke else 4,
                      max_position_embeddings=row, attn_implementation="packmask")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device, dtype).train(), cfg.vocab_size


def wrap(model, how: str, device):
    if how == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard
    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_backward(net, batch, count, world):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = net(**inputs).logits
    loss = packed_causal_lm_loss(logits, batch["labels"], position_ids=batch["position_ids"],
                                 cu_seq_lens=batch["cu_seq_lens_q"], num_items_in_batch=count) * world
    loss.backward()
    return loss.detach()


def run_case(how, plan, rows, args, device, dtype):
    rank, world = dist.get_rank(), dist.get_world_size()
    model, _ = make_model(args.smoke, device, dtype, args.row)
    net = wrap(model, how, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    collate = PackedCollator(max_length=args.row)
    batches = [to_device(collate([rows[i] for i in plan[s, rank]]), device) for s in range(plan.shape[0])]
    failures = []
    # probe: per-rank compute time without gradient communication (DDP only; FSDP2 must all-gather)
    probe = []
    if how == "ddp":
        for s, batch in enumerate(batches[:args.warmup + args.steps]):
            sync(device)
            t0 = time.perf_counter()
            with net.no_sync():
                forward_backward(net, batch, torch.tensor(1.0, device=device), 1)
            sync(device)
            probe.append(time.perf_counter() - t0)
            opt.zero_grad(set_to_none=True)
        probe = probe[args.warmup:]
    # timed training steps
    real_tokens = 0
    for s, batch in enumerate(batches[:args.warmup + args.steps]):
        if s == args.warmup:
            sync(device)
            dist.barrier()
            t0 = time.perf_counter()
        count = count_loss_items(batch, group=True)
        expected = sum(sum(max(n - 1, 0) for n in rows[i]["seq_lengths"]) for r in range(world) for i in plan[s, r])
        if int(count) != expected:
            failures.append(f"{how} step {s}: all-reduced count {int(count)} != planned {expected}")
        loss = forward_backward(net, batch, count, world)
        if not torch.isfinite(loss):
            failures.append(f"{how} step {s}: loss {loss.item()}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s >= args.warmup:
            real_tokens += sum(sum(rows[i]["seq_lengths"]) for r in range(world) for i in plan[s, r])
    sync(device)
    dist.barrier()
    wall = time.perf_counter() - t0
    gathered = [None] * world
    dist.all_gather_object(gathered, probe)
    ratio = None
    if how == "ddp":
        per_step = np.array(gathered)  # [ranks, steps]
        ratio = float((per_step.max(0) / per_step.mean(0)).mean())
    del net, model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(tokens_per_s_per_gpu=real_tokens / wall / world, wall_s=wall, step_time_max_over_mean=ratio,
                failures=failures)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, CPU / gloo, few steps (tests that it runs)")
    p.add_argument("--row", type=int, default=None, help="tokens per packed row (default 8192; smoke 256)")
    p.add_argument("--batch", type=int, default=1, help="rows per GPU per step")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; smoke 1)")
    p.add_argument("--wrappers", nargs="+", default=["ddp", "fsdp2"])
    p.add_argument("--out", default="benchmarks/train_step_ddp.json")
    args = p.parse_args(argv)
    args.row = args.row or (256 if args.smoke else 8192)
    args.steps = args.steps or (2 if args.smoke else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)

    cuda = torch.cuda.is_available() and not args.smoke
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    steps_needed = args.warmup + args.steps
    n_rows = steps_needed * world * args.batch * 4  # a few windows' worth of rows to choose from
    vocab = 512 if args.smoke else 32000
    rows = make_rows(n_rows, args.row, vocab)
    seq_lengths = [r["seq_lengths"] for r in rows]
    balanced = BalancedBatchSampler(seq_lengths, args.batch, world_size=world, rank=None, seed=0).steps()
    naive = round_robin_steps(len(rows), world, args.batch, seed=0)
    if min(len(balanced), len(naive)) < steps_needed:
        raise SystemExit(f"only {len(rows)} rows for {steps_needed} steps of {world} x {args.batch}")
    results, failures = [], []
    for how in args.wrappers:
        for name, plan in (("balanced", balanced), ("round-robin", naive)):
            r = run_case(how, plan[:steps_needed], rows, args, device, dtype)
            failures += r.pop("failures")
            results.append(dict(wrapper=how, sampler=name, **r))
    all_failures = [None] * world
    dist.all_gather_object(all_failures, failures)
    failures = [f for fs in all_failures for f in fs]
    if rank == 0:
        from rich.console import Console
        from rich.table import Table
        t = Table(title=f"packed SFT training, {world} x {'GPU' if cuda else 'CPU (smoke)'}, rows of {args.row}")
        for col in ("wrapper", "sampler", "real tokens/s per GPU", "step-time max/mean (ranks)", "wall s"):
            t.add_column(col, justify="right")
        for r in results:
            ratio = "" if r["step_time_max_over_mean"] is None else f"{r['step_time_max_over_mean']:.3f}"
            t.add_row(r["wrapper"], r["sampler"], f"{r['tokens_per_s_per_gpu']:,.0f}", ratio, f"{r['wall_s']:.2f}")
        Console().print(t)
        import transformers
        record = dict(results=results, failures=failures, args=vars(args), world_size=world,
                      device=torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
                      torch=torch.__version__, transformers=transformers.__version__,
                      date=datetime.date.today().isoformat())
        write_json(args.out, record)
        for f in failures:
            print("FAIL:", f)
    dist.barrier()  # rank 0 printed and wrote: tear the group down together (a rank leaving early can abort gloo)
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    code = main()
    # results are written and the group is gone: skip interpreter teardown, where a C++ thread of the
    # runtime occasionally aborts the process ("terminate called without an active exception", ~1 in 15
    # CPU runs) after the work succeeded
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
