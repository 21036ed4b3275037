"""Runs the tree kernel under Triton's CPU interpreter (``TRITON_INTERPRET=1`` must be set before triton
compiles anything, so tests/backends/test_tree_triton.py starts this in a fresh process) and prints the
relative errors it measured as one JSON line. Tiny shapes: the interpreter runs every block in numpy."""
import json
import os
import sys

import torch

import packmask
from packmask.backends.eager import eager_attention
from packmask.backends.spec import AttentionSpec
from packmask.backends.tree_triton import tree_triton_attention
from packmask.layout_tree import TreeLayout, analyse_tree_mask
from packmask.masks import tree_mask_from_segments
from packmask.testing import rel_err, tiny_model


def training_tree():
    """Two rows, depth-first: prompt | chosen | rejected, and a 3-level multi-turn tree."""
    rows = [[(0, 9, -1), (9, 6, 0), (15, 7, 0), (22, 5, -1), (27, 4, 3), (31, 9, 3)],
            [(0, 7, -1), (7, 5, 0), (12, 6, 1), (18, 6, 1), (24, 8, 0), (32, 8, 4)]]
    mask, _ = tree_mask_from_segments(rows, 40)
    return rows, mask


def draft_tree():
    """Breadth-first-ish random draft trees over a left-padded cache (not depth-first order)."""
    g = torch.Generator().manual_seed(0)
    parents = torch.stack([torch.tensor([-1] + [int(torch.randint(-1, i, (1,), generator=g)) for i in range(1, 24)])
                           for _ in range(2)])
    return TreeLayout.from_parents(parents, torch.tensor([19, 11]))


def compare(layout, H=4, Hkv=2, D=16, dtype=torch.float32, window=None, softcap=None, kv_len=None, wrong=None):
    """Forward and q/k/v gradients of the kernel against eager math with the dense mask; with ``wrong``
    (another layout of the same shape) the kernel runs that one instead: the control."""
    torch.manual_seed(0)
    B, N = layout.batch_size, layout.seq_len
    kv = kv_len or layout.key_len
    q = torch.randn(B, H, N, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, kv, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, kv, D, dtype=dtype, requires_grad=True)
    spec = AttentionSpec(scale=D ** -0.5, sliding_window=window, softcap=softcap)
    out = tree_triton_attention(q, k, v, wrong or layout, spec)
    ref = eager_attention(q.float(), k.float(), v.float(), layout.dense_mask(window, kv_len=kv_len), spec, False)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out.float(), (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    return [rel_err(out.float(), ref)] + [rel_err(a.float(), b.float()) for a, b in zip(grads, ref_grads)]


def model_level():
    """tiny llama on a packed tree mask: backend tree_triton against backend sdpa (logits, parameter grads)."""
    rows, mask = training_tree()
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    results = {}
    for name in ("sdpa", "tree_triton"):
        model = tiny_model("llama", num_hidden_layers=1, hidden_size=32, intermediate_size=48)
        with packmask.backend(name):
            out = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
        out.loss.backward()
        results[name] = (out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (a, ga), (b, gb) = results["tree_triton"], results["sdpa"]
    return [rel_err(a, b), max(rel_err(ga[n], gb[n]) for n in gb)]


def compiled_no_recompile():
    """torch.compile (aot_eager: traces forward and backward) over the prepared-inputs entry point: a second
    tree of the same shape reuses the graph (error_on_recompile), and both match eager math."""
    import torch._dynamo
    from packmask.backends.tree_triton import _config, tree_attention_from_inputs, tree_kernel_inputs
    torch._dynamo.reset()
    fn = torch.compile(tree_attention_from_inputs, backend="aot_eager", fullgraph=True)
    errs = []
    other = [[(0, 12, -1), (12, 10, 0), (22, 18, 0)], [(0, 5, -1), (5, 20, 0), (25, 15, 1)]]
    for i, rows in enumerate((training_tree()[0], other)):
        layout = analyse_tree_mask(tree_mask_from_segments(rows, 40)[0])
        torch.manual_seed(i)
        q = torch.randn(2, 4, 40, 16, requires_grad=True)
        k, v = (torch.randn(2, 2, 40, 16, requires_grad=True) for _ in range(2))
        spec = AttentionSpec(scale=0.25)
        fcfg, bcfg = _config(40, 16, True)
        inputs = tree_kernel_inputs(layout, 40, None, fcfg[0], fcfg[1])
        out = fn(q, k, v, inputs, inputs, spec, fcfg, bcfg)
        ref = eager_attention(q, k, v, layout.dense_mask(), spec, False)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
        errs.append(max([rel_err(out, ref)] + [rel_err(a, b) for a, b in zip(grads, ref_grads)]))
        torch._dynamo.config.error_on_recompile = True
    torch._dynamo.config.error_on_recompile = False
    return errs


def compiled_model_no_recompile():
    """torch.compile(model) (aot_eager) on tree rows: the forward pre-hook hands the layers the kernel's
    inputs as tensors; three different trees of one shape compile once (error_on_recompile after the
    first); logits and parameter gradients equal the eager model on sdpa. Returns the worst errors and
    a control (the same rows without the tree mask)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model("llama", num_hidden_layers=1, hidden_size=32, intermediate_size=48).train()
    compiled = torch.compile(model, backend="aot_eager")

    def run(fn, ids, mask):
        model.zero_grad()
        out = fn(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    errs, control = [], None
    trees = ([[(0, 10, -1), (10, 12, 0), (22, 10, 0)]], [[(0, 5, -1), (5, 20, 0), (25, 7, 0)]],
             [[(0, 8, -1), (8, 4, 0), (12, 12, 1), (24, 8, 1)]])
    try:
        for i, rows in enumerate(trees):
            mask, pos = tree_mask_from_segments(rows, 32)
            ids = torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(i))
            with packmask.backend("sdpa"):
                ref, ref_grads = run(model, ids, mask)
            with packmask.backend("tree_triton"):  # opt-in until measured on a GPU (backends.costs)
                out, grads = run(compiled, ids, mask)
            errs.append(max([rel_err(out, ref)] + [rel_err(grads[n], g) for n, g in ref_grads.items()]))
            if control is None:
                control = rel_err(run(model, ids, None)[0], ref)
            torch._dynamo.config.error_on_recompile = True
    finally:
        torch._dynamo.config.error_on_recompile = False
    breaks = [r for r in counters["graph_break"] if "_packmask_pre_forward" not in r]  # the pre-hook (forward_inputs)
    return errs + [control, float(len(breaks))]


def split_kv(layout):
    """Split-KV forward (three shares of every key list, merged by log-sum-exp): forward and backward."""
    os.environ["PACKMASK_TREE_SPLITS"] = "3"
    try:
        return compare(layout, window=12)
    finally:
        del os.environ["PACKMASK_TREE_SPLITS"]


def main():
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (triton's CPU interpreter), as test_tree_triton.py does")
    rows, mask = training_tree()
    train = analyse_tree_mask(mask)
    other = [list(r) for r in rows]
    other[0][2] = (15, 7, 1)  # the rejected branch hangs under chosen instead of the prompt
    wrong = analyse_tree_mask(tree_mask_from_segments(other, 40)[0])
    drafts = draft_tree()
    report = {
        "train_fp32": compare(train),
        "train_control": compare(train, wrong=wrong),
        "train_softcap_window": compare(train, softcap=5.0, window=6),
        "draft_fp32": compare(drafts),
        "draft_window_cropped": compare(drafts, window=8, kv_len=7 + drafts.seq_len),
        "draft_split_kv": split_kv(drafts),
        "draft_mha_fp16": compare(drafts, H=2, Hkv=2, dtype=torch.float16),
        "model_llama": model_level(),
        "compiled": compiled_no_recompile(),
        "compiled_model": compiled_model_no_recompile(),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
