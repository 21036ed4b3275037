"""The cache-split path of varlen (draft-tree verification): its gathers and log-sum-exp merge, on CPU.

The varlen kernel itself needs CUDA (tests/backends/test_tree_cuda.py checks it on a GPU); here it
is replaced by a per-sequence fp32 reference with the same contract (flat queries / keys,
cu_seqlens, bottom-right causal, returns out and lse; an empty key set leaves NaN, as nothing
promises what a kernel writes there), so everything around it is checked exactly: fp32, rel err <=
1e-5 against dense attention over the layout's mask, with a control (the tree part alone).
"""
from __future__ import annotations

import pytest
import torch

from packmask.backends import varlen
from packmask.backends.spec import AttentionSpec
from packmask.layout_tree import TreeLayout
from packmask.testing import rel_err

TOL = 1e-5


def _reference_varlen_lse(qf, kf, vf, cu_q, cu_k, max_q, max_k, causal, scale):
    T, H, D = qf.shape
    out = torch.full((T, H, D), float("nan"))
    lse = torch.full((T, H), float("nan"))
    for i in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        if k1 == k0:
            continue  # an empty key set: whatever the kernel leaves (NaN here)
        qs = qf[q0:q1].float()
        ks = kf[k0:k1].float().repeat_interleave(H // kf.shape[1], 1)
        vs = vf[k0:k1].float().repeat_interleave(H // vf.shape[1], 1)
        s = torch.einsum("nhd,mhd->hnm", qs, ks) * scale
        n, m = q1 - q0, k1 - k0
        if causal:  # bottom-right aligned
            s = s.masked_fill(torch.arange(m)[None] > torch.arange(n)[:, None] + (m - n), float("-inf"))
        lse[q0:q1] = s.logsumexp(-1).transpose(0, 1)
        out[q0:q1] = torch.einsum("hnm,mhd->nhd", s.softmax(-1), vs)
    return out.to(qf.dtype), lse


def _dense(q, k, v, mask, scale):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    return (s.masked_fill(~mask, float("-inf")).softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("past_lengths", [[9, 5], [9, 0]], ids=["left-padded cache", "a row without cache"])
def test_split_cache_attention_equals_dense(monkeypatch, past_lengths):
    monkeypatch.setattr(varlen, "_varlen_lse", _reference_varlen_lse)
    parents = torch.tensor([[-1, 0, 0, 1, 1, 2, -1, 6], [-1, 0, 1, 2, 0, 4, 4, 1]])
    layout = TreeLayout.from_parents(parents, torch.tensor(past_lengths))
    torch.manual_seed(0)
    B, N, K = layout.batch_size, layout.seq_len, layout.key_len
    q = torch.randn(B, 4, N, 16)
    k, v = torch.randn(B, 2, K, 16), torch.randn(B, 2, K, 16)
    spec = AttentionSpec(scale=0.25)
    out = varlen._split_cache_attention(q, k, v, layout, spec)
    ref = _dense(q, k, v, layout.dense_mask(), spec.scale)
    assert rel_err(out, ref) <= TOL
    # control: the tree part alone (the cache part dropped from the merge) is far off
    tree_only = _dense(q, k, v, layout.dense_mask() & (torch.arange(K) >= layout.past), spec.scale)
    assert rel_err(tree_only, ref) > 1e-2


def test_merge_is_the_log_sum_exp_merge():
    torch.manual_seed(1)
    out_a, out_b = torch.randn(5, 3, 8), torch.randn(5, 3, 8)
    lse_a, lse_b = torch.randn(5, 3) * 4, torch.randn(5, 3) * 4
    lse_a[0] = float("-inf")  # a part over no keys weighs 0
    lse = torch.logaddexp(lse_a, lse_b)
    ref = out_a * (lse_a - lse).exp()[..., None] + out_b * (lse_b - lse).exp()[..., None]
    got = varlen.merge_partial_attention(out_a, lse_a, out_b, lse_b, torch.float32)
    assert rel_err(got, ref) <= TOL
    assert torch.equal(got[0], out_b[0])
    assert rel_err(varlen.merge_partial_attention(out_b, lse_a, out_a, lse_b, torch.float32), ref) > 1e-2  # control
