"""GPU checks of the tree kernels (varlen decomposition, flex tree BlockMask) against fp32 math.

Marked ``cuda``: skipped without CUDA, real failures on a GPU. Forward and backward (q, k, v
gradients) of bf16 kernels against the dense-mask fp32 reference.
"""
from __future__ import annotations

import pytest
import torch

from packmask.backends.spec import AttentionSpec
from packmask.backends.flex import flex_attention_call
from packmask.backends.varlen import tree_varlen_attention
from packmask.layout_tree import TreeLayout
from packmask.testing import rel_err

pytestmark = pytest.mark.cuda
BF16_TOL = 2e-2


def _reference(q, k, v, mask, scale):
    """fp32 math with a dense mask; q [B,H,N,D], k/v [B,Hkv,K,D] -> [B,N,H,D]."""
    q, k, v = q.float(), k.float(), v.float()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, -1) @ v).transpose(1, 2)


def _training_tree(device):
    rows = [[(0, 150, -1), (150, 90, 0), (240, 70, 0), (310, 60, -1), (370, 80, 3), (450, 40, 3)],
            [(0, 300, -1), (300, 100, 0), (400, 60, 0), (460, 50, 0)]]
    return TreeLayout.from_segments(rows, 520, device=device)


def _draft_tree(device):
    g = torch.Generator().manual_seed(0)
    parents = torch.stack([torch.tensor([-1] + [int(torch.randint(-1, i, (1,), generator=g)) for i in range(1, 40)])
                           for _ in range(2)])
    return TreeLayout.from_parents(parents.to(device), torch.tensor([300, 260], device=device))


def _check(kernel, layout, window=None, kv_len=None, H=4, Hkv=2, D=64):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dev = "cuda"
    torch.manual_seed(0)
    B, N = layout.batch_size, layout.seq_len
    kv = kv_len or layout.key_len
    q = torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, Hkv, kv, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, Hkv, kv, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    spec = AttentionSpec(scale=D ** -0.5, sliding_window=window)
    out = kernel(q, k, v, layout, spec)
    mask = layout.dense_mask(window, kv_len=kv_len)
    ref = _reference(q, k, v, mask, spec.scale)
    assert rel_err(out.float(), ref) <= BF16_TOL
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out.float(), (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads):
        assert rel_err(a.float(), b.float()) <= BF16_TOL
    # control: the plain causal mask over the same keys is far off
    wrong = _reference(q, k, v, torch.ones_like(mask).tril(kv - N), spec.scale)
    assert rel_err(wrong, ref) > 1e-1


FLEX_FAILS = pytest.mark.xfail(
    reason="torch 2.11 inductor: no valid triton config for the tree BlockMask on H100 (shared memory over the limit); "
           "flex refuses tree layouts, so the dispatcher never sends them there", strict=False)
KERNELS = [tree_varlen_attention, pytest.param(flex_attention_call, marks=FLEX_FAILS)]


@pytest.mark.parametrize("kernel", KERNELS, ids=["varlen", "flex"])
def test_training_tree(kernel):
    _check(kernel, _training_tree("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.mark.parametrize("kernel", KERNELS, ids=["varlen", "flex"])
def test_draft_tree_over_cache(kernel):
    _check(kernel, _draft_tree("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.mark.parametrize("kernel", KERNELS, ids=["varlen", "flex"])
def test_draft_tree_sliding_window_cropped_cache(kernel):
    layout = _draft_tree("cuda" if torch.cuda.is_available() else "cpu")
    _check(kernel, layout, window=64, kv_len=63 + layout.seq_len)  # a sliding cache layer keeps window - 1


def test_draft_tree_verification_without_grad_splits_the_cache():
    """Inference over a cache: cache part and tree part merged by log-sum-exp (no gradients)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    layout = _draft_tree("cuda")
    torch.manual_seed(1)
    B, N, K = layout.batch_size, layout.seq_len, layout.key_len
    q = torch.randn(B, 4, N, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, 2, K, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    spec = AttentionSpec(scale=0.125)
    with torch.no_grad():
        out = tree_varlen_attention(q, k, v, layout, spec)
    assert ("split", K) in layout._memo
    ref = _reference(q, k, v, layout.dense_mask(), spec.scale)
    assert rel_err(out.float(), ref) <= BF16_TOL
