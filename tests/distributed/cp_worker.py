"""torchrun worker for tests/distributed/test_context_parallel.py: context-parallel runs vs one process.

``torchrun --standalone --nproc-per-node W tests/distributed/cp_worker.py OUT.json`` runs every case for the
world size W on gloo (CPU, fp32) and global rank 0 writes ``{case: {...errors...}}`` to OUT.json
(atomically). Kept out of pytest collection (no ``test_`` prefix).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

import packmask
from packmask.distributed.context_parallel import ContextParallel
from packmask.distributed.cp_attention import ContextParallelLayout
from packmask.errors import PackmaskError, UnsupportedModelError
from packmask.integration import LAYOUT_KWARG
from packmask.testing import grad_rel_err, rel_err, tiny_model
from _teardown import finish_process

#: rows of 48 tokens, 3-7 documents, each row with one document longer than half a row
#: (longer than a rank's share at cp = 2 and 4); row 1 ends with 4 padding tokens
SEQ_LENGTHS = [[26, 9, 6, 4, 3], [5, 3, 28, 6, 2]]
SEQ_LENGTHS_B = [[4, 30, 3, 5, 6], [7, 7, 25, 4, 3, 2]]  # the second data-parallel rank's batch
N = 48


def make_batch(seq_lengths, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (len(seq_lengths), N), generator=g)
    labels = ids.clone()
    for b, row in enumerate(seq_lengths):
        starts = torch.tensor([0] + row[:-1]).cumsum(0)
        labels[b, starts] = -100  # a document's first token is never predicted from the previous one
        labels[b, sum(row):] = -100  # row padding
    return dict(input_ids=ids, labels=labels, seq_lengths=seq_lengths)


def reference(family, overrides, batch):
    model = tiny_model(family, **overrides)
    out = model(**batch, use_cache=False)
    out.loss.backward()
    return model, out.logits.detach(), out.loss.detach()


def cp_run(family, overrides, batch, mesh, strategy="balanced", corrupt=False, checkpointing=False):
    model = tiny_model(family, **overrides)
    if checkpointing:  # the backward recomputes each layer, all-gather included
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    with ContextParallel(mesh, model=model, strategy=strategy) as ctx:
        local = ctx.shard(batch)
        if corrupt:  # a wrong split: documents see each other across ranks (one document per row)
            plan = ctx.plan
            bad = dataclasses.replace(plan, doc_ids=torch.zeros_like(plan.doc_ids),
                                      position_ids=torch.arange(plan.seq_len).expand_as(plan.doc_ids).clone())
            local[LAYOUT_KWARG] = ContextParallelLayout(bad, ctx.rank, ctx.group)
        out = model(**local)
        out.loss.backward()
        ctx.all_reduce_gradients(model)
        assert torch.allclose(ctx.loss(out.logits.detach()), out.loss.detach(), rtol=1e-6), "ctx.loss != out.loss"
        return model, ctx.gather(out.logits.detach()), ctx.reduce(out.loss)


def compare(name, family, overrides, mesh, results, strategy="balanced", corrupt=False, data_rank=0, dp=1,
            checkpointing=False):
    begin = time.perf_counter()
    batches = [make_batch(SEQ_LENGTHS, 0), make_batch(SEQ_LENGTHS_B, 1)][:dp]
    model, logits, loss = cp_run(family, overrides, batches[data_rank], mesh, strategy, corrupt, checkpointing)
    if dp > 1:  # logits of every data rank's rows, for the comparison on global rank 0
        parts = [torch.empty_like(logits) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, logits.contiguous())
        logits = torch.cat(parts[::dist.get_world_size() // dp], 0)  # context rank 0 of each data rank
    if dist.get_rank() == 0:
        full = {k: torch.cat([b[k] for b in batches]) for k in ("input_ids", "labels")}
        full["seq_lengths"] = sum((b["seq_lengths"] for b in batches), [])
        ref_model, ref_logits, ref_loss = reference(family, overrides, full)
        grad_err, worst = grad_rel_err(model, ref_model)
        results[name] = dict(logits=rel_err(logits, ref_logits), loss=abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()),
                             grads=grad_err, worst_param=worst, seconds=round(time.perf_counter() - begin, 2))
    dist.barrier()


def compare_fsdp2(name, results):
    """FSDP2 over the same ranks as the context group: sharded parameters; FSDP2 averages gradients over
    its ranks, so the backward runs on loss * world_size (gloo has no PREMUL_SUM for a divide factor of 1)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    begin = time.perf_counter()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("context",))
    batch = make_batch(SEQ_LENGTHS, 0)
    model = tiny_model("llama")
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    with ContextParallel(mesh, model=model) as ctx:
        out = model(**ctx.shard(batch))
        (out.loss * ctx.world_size).backward()  # every rank's loss is already divided by the global count
        logits, loss = ctx.gather(out.logits.detach()), ctx.reduce(out.loss)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    if dist.get_rank() == 0:
        ref_model, ref_logits, ref_loss = reference("llama", {}, batch)
        worst = max((rel_err(grads[n], p.grad), n) for n, p in ref_model.named_parameters())
        results[name] = dict(logits=rel_err(logits, ref_logits), loss=abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()),
                             grads=worst[0], worst_param=worst[1], seconds=round(time.perf_counter() - begin, 2))
    dist.barrier()


def expect_error(name, fn, error_type, results, *needles):
    try:
        fn()
    except error_type as e:
        msg = str(e)
        missing = [n for n in needles if n not in msg]
        results[name] = dict(ok=not missing, message=msg, missing=missing)
    else:
        results[name] = dict(ok=False, message="no error raised")


def main(out_path):
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    world = dist.get_world_size()
    results = {}
    try:
        mha = dict(num_key_value_heads=4)
        compare("llama", "llama", mha, None, results)
        compare("llama_gqa_zigzag", "llama", {}, None, results, strategy="zigzag")
        compare("mistral_window", "mistral", {}, None, results)
        compare("llama_prefix_split", "llama", mha, None, results, strategy="prefix")
        compare("control_documents_see_each_other", "llama", mha, None, results, corrupt=True)
        if world == 2:
            compare_fsdp2("fsdp2_llama", results)
            compare("llama_gradient_checkpointing", "llama", {}, None, results, checkpointing=True)
        if world == 4:
            from torch.distributed.device_mesh import init_device_mesh
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("data", "context"))
            compare("mesh_data2_context2", "llama", {}, mesh, results, data_rank=mesh.get_local_rank("data"), dp=2)
        # bad input: a row that does not split evenly
        odd = make_batch([[10, 5]], 0)
        odd = dict(input_ids=odd["input_ids"][:, :N - 1], seq_lengths=[[10, N - 11]])
        expect_error("error_not_divisible", lambda: ContextParallel(None).shard(odd), PackmaskError, results,
                     "pad every row to a multiple of", "pad_to_multiple_of")
        # bad input: a family packmask cannot shard
        expect_error("error_recurrent_family", lambda: ContextParallel(None, model=tiny_model("mamba")),
                     UnsupportedModelError, results, "mamba", "context-parallel")
        # bad input: ranks of one context group given different rows
        rows = make_batch(SEQ_LENGTHS, dist.get_rank())
        expect_error("error_different_batches", lambda: ContextParallel(None).shard(rows), PackmaskError, results,
                     "different batches")
        # a model whose attention never receives the layout is refused while the context is active
        model = tiny_model("llama")
        with ContextParallel(None, model=model) as ctx:
            local = ctx.shard(make_batch(SEQ_LENGTHS, 0))
            local.pop(LAYOUT_KWARG)
            expect_error("error_layout_not_forwarded", lambda: model(**local), PackmaskError, results,
                         "packmask_layout")
        # a model not on packmask would ignore the layout
        sdpa = tiny_model("llama", attn_implementation="sdpa")
        expect_error("error_not_packmask", lambda: sdpa(**ContextParallel(None).shard(make_batch(SEQ_LENGTHS, 0))),
                     PackmaskError, results, "attn_implementation='packmask'")
    except Exception:  # noqa: BLE001 — report instead of hanging the other ranks' pytest
        results["crash"] = dict(rank=dist.get_rank(), traceback=traceback.format_exc())
        print(results["crash"]["traceback"], file=sys.stderr)
    if dist.get_rank() == 0:
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
    finish_process(0)
