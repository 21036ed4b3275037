"""GPU checks of the one-launch tree kernel (packmask.backends.tree_triton) against fp32 math.

Marked ``cuda``: skipped without CUDA, real failures on a GPU. Forward and q/k/v gradients in fp32
(tf32 off: the kernel uses exact fp32 dots) and bf16, on a training tree, a draft tree over a
left-padded cache (breadth-first order), a sliding layer's cropped cache and softcapping; a control
(the plain causal mask over the same keys) differs. Under torch.compile (inductor) the model-free
entry point compiles once and serves batches with other trees without recompiling.
"""
from __future__ import annotations

import pytest
import torch

from packmask.backends.spec import AttentionSpec
from packmask.layout_tree import TreeLayout, analyse_tree_mask
from packmask.masks import tree_mask_from_segments
from packmask.testing import rel_err

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _reference(q, k, v, mask, scale, softcap=None):
    q, k, v = q.float(), k.float(), v.float()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, -1) @ v).transpose(1, 2)


def _training_tree(rows=None):
    rows = rows or [[(0, 150, -1), (150, 90, 0), (240, 70, 0), (310, 60, -1), (370, 80, 3), (450, 70, 3)],
                    [(0, 300, -1), (300, 100, 0), (400, 60, 0), (460, 30, 2), (490, 30, 2)]]
    return analyse_tree_mask(tree_mask_from_segments(rows, 520)[0].cuda())


def _draft_tree():
    g = torch.Generator().manual_seed(0)
    parents = torch.stack([torch.tensor([-1] + [int(torch.randint(-1, i, (1,), generator=g)) for i in range(1, 64)])
                           for _ in range(2)])
    return TreeLayout.from_parents(parents.cuda(), torch.tensor([300, 260], device="cuda"))


def _check(layout, dtype, window=None, kv_len=None, softcap=None, H=8, Hkv=2, D=64):
    from packmask.backends.tree_triton import tree_triton_attention
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    B, N = layout.batch_size, layout.seq_len
    kv = kv_len or layout.key_len
    q = torch.randn(B, N, H, D, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()  # transformers' strides
    k = torch.randn(B, Hkv, kv, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, kv, D, device="cuda", dtype=dtype, requires_grad=True)
    spec = AttentionSpec(scale=D ** -0.5, sliding_window=window, softcap=softcap)
    out = tree_triton_attention(q, k, v, layout, spec)
    mask = layout.dense_mask(window, kv_len=kv_len)
    ref = _reference(q, k, v, mask, spec.scale, softcap)
    tol = TOL[dtype]
    assert rel_err(out.float(), ref) <= tol
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out.float(), (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads):
        assert rel_err(a.float(), b.float()) <= tol
    wrong = _reference(q, k, v, torch.ones_like(mask).tril(kv - N), spec.scale, softcap)
    assert rel_err(wrong, ref) > 1e-1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_training_tree(dtype):
    _check(_training_tree(), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_draft_tree_over_cache(dtype):
    _check(_draft_tree(), dtype)


def test_draft_tree_sliding_window_cropped_cache():
    layout = _draft_tree()
    _check(layout, torch.bfloat16, window=64, kv_len=63 + layout.seq_len)


def test_training_tree_softcap_window_head_dim_128():
    _check(_training_tree(), torch.bfloat16, window=100, softcap=30.0, D=128, H=4, Hkv=4)


def test_dispatcher_runs_the_tree_kernel_for_cuda_trees_when_forced():
    from packmask.backends import choose_backend
    layout = _training_tree()
    q = torch.zeros(2, 4, 520, 64, device="cuda", dtype=torch.bfloat16)
    assert choose_backend(layout, AttentionSpec(scale=0.125), q, training=True, requested="tree_triton") == "tree_triton"


def test_compiled_inductor_no_recompile_across_trees():
    import torch._dynamo
    from packmask.backends.tree_triton import _config, tree_attention_from_inputs, tree_kernel_inputs
    torch._dynamo.reset()
    fn = torch.compile(tree_attention_from_inputs, fullgraph=True)
    other = [[(0, 100, -1), (100, 200, 0), (300, 220, 0)], [(0, 50, -1), (50, 250, 0), (300, 120, 1), (420, 100, 1)]]
    try:
        for i, layout in enumerate((_training_tree(), _training_tree(other), _training_tree())):
            torch.manual_seed(i)
            q = torch.randn(2, 8, 520, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k, v = (torch.randn(2, 2, 520, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
            spec = AttentionSpec(scale=0.125)
            fcfg, bcfg = _config(520, 64, False)
            fwd = tree_kernel_inputs(layout, 520, None, fcfg[0], fcfg[1], "cuda")
            bwd = tree_kernel_inputs(layout, 520, None, bcfg[0], bcfg[1], "cuda")
            out = fn(q, k, v, fwd, bwd, spec, fcfg, bcfg)
            ref = _reference(q, k, v, layout.dense_mask(), 0.125)
            assert rel_err(out.float(), ref) <= 2e-2
            grads = torch.autograd.grad(out.float().sum(), (q, k, v))
            ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
            assert max(rel_err(a.float(), b) for a, b in zip(grads, ref_grads)) <= 2e-2
            torch._dynamo.config.error_on_recompile = True  # warm: later trees must reuse the graph
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()


def test_compiled_model_on_tree_rows_no_recompile():
    """torch.compile(model) (inductor) on tree rows: the pre-hook hands the layers the kernel's inputs as
    tensors, so three trees of one shape compile once; logits and grads match the eager model on sdpa."""
    import torch._dynamo
    import packmask
    from packmask.testing import tiny_model
    torch._dynamo.reset()
    model = tiny_model("llama", dtype=torch.bfloat16, hidden_size=256, num_attention_heads=4,
                       num_key_value_heads=2).cuda().train()
    compiled = torch.compile(model)
    trees = ([[(0, 100, -1), (100, 200, 0), (300, 212, 0)]], [[(0, 40, -1), (40, 300, 0), (340, 172, 0)]],
             [[(0, 64, -1), (64, 100, 0), (164, 200, 1), (364, 148, 1)]])

    def run(fn, ids, mask):
        model.zero_grad()
        out = fn(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
        out.loss.backward()
        return out.logits.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()}
    try:
        for i, rows in enumerate(trees):
            mask = tree_mask_from_segments(rows, 512)[0].cuda()
            ids = torch.randint(0, 128, (1, 512), generator=torch.Generator().manual_seed(i)).cuda()
            with packmask.backend("sdpa"):
                ref, ref_grads = run(model, ids, mask)
            with packmask.backend("tree_triton"):  # opt-in until measured on a GPU (backends.costs)
                out, grads = run(compiled, ids, mask)
            assert rel_err(out, ref) <= 2e-2
            assert max(rel_err(grads[n], g) for n, g in ref_grads.items()) <= 5e-2
            torch._dynamo.config.error_on_recompile = True
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()
