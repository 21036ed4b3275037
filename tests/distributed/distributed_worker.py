"""Run under ``torchrun --nproc-per-node 2``: packed data-parallel training vs one process, unpacked.

Each configuration trains a tiny fp32 Llama (``attn_implementation="packmask"``) for 3 optimizer
steps of 2 accumulated micro-batches per rank, rows dealt by ``BalancedBatchSampler``, and compares
the parameters with one process running the same documents *unpacked* (one document per padded row,
sdpa, 2D padding mask) in one big batch per step, with the same loss reduction. SGD (no momentum):
the update is proportional to the gradient, so a wrong normalisation shows up in full (Adam would
hide a constant factor). Rank 0 writes ``{config: {param_rel_err, update_rel_err, ...}}`` as JSON.

    torchrun --standalone --nproc-per-node 2 tests/distributed/distributed_worker.py OUT.json [config ...]

configs: ddp-token ddp-sequence fsdp2-token fsdp2-sequence ddp-token-local-count (the control: each
micro-batch divided by its own count, the usual per-batch mean / accumulation steps).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import packmask
from packmask.data.collator import PackedCollator
from packmask.data.loss import packed_causal_lm_loss
from packmask.data.packing import pack_lengths
from packmask.distributed import BalancedBatchSampler, count_loss_items
from packmask.testing import tiny_model
from _teardown import finish_process

ROW, BATCH, ACCUM, STEPS, LR, VOCAB = 32, 2, 2, 3, 2.0, 128
ALL = ["ddp-token", "ddp-sequence", "fsdp2-token", "fsdp2-sequence", "ddp-token-local-count"]


def make_rows(seed: int = 0):
    """Documents of 2..28 tokens packed (best-fit decreasing) into rows of <= ROW tokens."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 29, size=90)
    docs = [rng.integers(1, VOCAB, size=n).tolist() for n in lengths]
    a = pack_lengths(lengths, ROW)
    rows = []
    for r in range(a.num_rows):
        lo, hi = a.row_offsets[r], a.row_offsets[r + 1]
        seqs = [docs[d][s:s + n] for d, s, n in zip(a.doc_index[lo:hi], a.start[lo:hi], a.length[lo:hi])]
        rows.append({"input_ids": [t for q in seqs for t in q], "seq_lengths": [len(q) for q in seqs]})
    return rows


def micro_batches(rows, world: int):
    """``plan[rank][micro_step]`` = row indices, from the balanced sampler's deterministic plan."""
    plan = BalancedBatchSampler([r["seq_lengths"] for r in rows], BATCH, world_size=world, rank=None, seed=1,
                                window_steps=4).steps()
    assert plan.shape[0] >= STEPS * ACCUM, plan.shape
    return [[plan[m, r].tolist() for m in range(STEPS * ACCUM)] for r in range(world)]


def documents_of(rows, indices):
    out = []
    for i in indices:
        ids, start = rows[i]["input_ids"], 0
        for n in rows[i]["seq_lengths"]:
            out.append(ids[start:start + n])
            start += n
    return out


def reference_updates(rows, plan, reduction: str):
    """One process, every document of a step unpacked in one padded batch."""
    model = tiny_model("llama", attn_implementation="sdpa").train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    world = len(plan)
    for step in range(STEPS):
        idx = [i for r in range(world) for m in range(step * ACCUM, (step + 1) * ACCUM) for i in plan[r][m]]
        docs = documents_of(rows, idx)
        width = max(len(d) for d in docs)
        ids = torch.zeros(len(docs), width, dtype=torch.long)
        mask = torch.zeros(len(docs), width, dtype=torch.long)
        for b, d in enumerate(docs):
            ids[b, :len(d)] = torch.tensor(d)
            mask[b, :len(d)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        target = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
        ce = F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1), reduction="none",
                             ignore_index=-100).reshape(target.shape)
        valid = (target != -100).float()
        if reduction == "token":
            loss = ce.sum() / valid.sum()
        else:
            loss = ((ce.sum(1) / valid.sum(1)).sum()) / len(docs)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_packed(rows, plan, config: str):
    rank, world = dist.get_rank(), dist.get_world_size()
    wrapper, reduction = config.split("-")[:2]
    local_count = config.endswith("local-count")
    model = tiny_model("llama").train()  # attn_implementation="packmask", same seed as the reference
    if wrapper == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        net = fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    collate = PackedCollator()
    for step in range(STEPS):
        batches = [collate([rows[i] for i in plan[rank][m]]) for m in range(step * ACCUM, (step + 1) * ACCUM)]
        count = None if local_count else count_loss_items(batches, reduction=reduction, group=True)
        for a, batch in enumerate(batches):
            last = a == ACCUM - 1
            if wrapper == "ddp":
                sync = contextlib.nullcontext() if last else net.no_sync()
            else:
                net.set_requires_gradient_sync(last)
                sync = contextlib.nullcontext()
            with sync:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                logits = net(**inputs).logits
                loss = packed_causal_lm_loss(logits, batch["labels"], position_ids=batch["position_ids"],
                                             reduction=reduction, num_items_in_batch=count)
                # DDP / FSDP average gradients over ranks: a share of a global mean is scaled back up;
                # the control is the usual "mean of this micro-batch / accumulation steps"
                loss = loss / ACCUM if local_count else loss * world
                loss.backward()
        opt.step()
        opt.zero_grad()
    full = {}
    sharded = all(hasattr(p, "full_tensor") for p in model.parameters())
    for n, p in model.named_parameters():
        t = p.detach()
        full[n] = t.full_tensor() if hasattr(t, "full_tensor") else t.clone()
    return full, sharded


def reduce_across_matches(rows, plan) -> bool:
    """``packed_causal_lm_loss(reduce_across=True)`` divides by the same all-reduced count as
    ``count_loss_items(group=True)`` (one micro-batch per rank)."""
    rank = dist.get_rank()
    batch = PackedCollator()([rows[i] for i in plan[rank][0]])
    logits = torch.randn(*batch["input_ids"].shape, VOCAB, generator=torch.Generator().manual_seed(rank))
    kwargs = dict(position_ids=batch["position_ids"], reduction="sequence")
    a = packed_causal_lm_loss(logits, batch["labels"], reduce_across=True, **kwargs)
    b = packed_causal_lm_loss(logits, batch["labels"], num_items_in_batch=count_loss_items(
        batch, reduction="sequence", group=True), **kwargs)
    local = packed_causal_lm_loss(logits, batch["labels"], **kwargs)
    return bool(torch.equal(a, b)) and not torch.allclose(a, local)


def flat(params):
    return torch.cat([params[n].reshape(-1).double() for n in sorted(params)])


def main():
    out_path, configs = sys.argv[1], sys.argv[2:] or ALL
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = make_rows()
    plan = micro_batches(rows, world)
    used = [i for r in range(world) for m in plan[r] for i in m]
    initial = flat({n: p.detach() for n, p in tiny_model("llama", attn_implementation="sdpa").named_parameters()})
    matches = reduce_across_matches(rows, plan)
    results, references, fsdp_sharded = {}, {}, []
    for config in configs:
        reduction = config.split("-")[1]
        params, sharded = train_packed(rows, plan, config)
        if config.startswith("fsdp2"):
            fsdp_sharded.append(sharded)
        packed = flat(params)
        if rank == 0:
            if reduction not in references:
                references[reduction] = flat(reference_updates(rows, plan, reduction))
            ref = references[reduction]
            results[config] = {
                "param_rel_err": ((packed - ref).norm() / ref.norm()).item(),
                "update_rel_err": ((packed - ref).norm() / (ref - initial).norm()).item(),
                "update_norm": (ref - initial).norm().item(),
            }
        dist.barrier()
    if rank == 0:
        results["_meta"] = {"world_size": world, "fsdp2_sharded": bool(fsdp_sharded) and all(fsdp_sharded),
                            "reduce_across_matches": matches,
                            "rows_used": len(used), "distinct_rows_used": len(set(used)),
                            "documents_per_step": [len(documents_of(rows, [i for r in range(world) for m in
                                                   plan[r][s * ACCUM:(s + 1) * ACCUM] for i in m]))
                                                   for s in range(STEPS)],
                            "torch": torch.__version__, "packmask": packmask.__version__}
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, out_path)


if __name__ == "__main__":
    main()
    finish_process(0)
