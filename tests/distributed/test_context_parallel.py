"""Context parallelism: the shard plan, the per-rank attention, and torchrun runs vs one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from packmask.backends import AttentionSpec
from packmask.backends.eager import eager_attention
from packmask.distributed.context_parallel import ContextParallel, _layout_of, shift_labels
from packmask.distributed.cp_attention import dense_cp_mask, varlen_pieces
from packmask.distributed.cp_plan import attention_cost, plan_context_parallel
from packmask.errors import PackmaskError
from packmask.layout import DocumentLayout, analyse_mask
from packmask.masks import prefix_lm_mask
from packmask.testing import rel_err

WORKER = Path(__file__).with_name("cp_worker.py")


@st.composite
def packed_rows(draw):
    cp = draw(st.sampled_from([1, 2, 3, 4, 8]))
    n = draw(st.integers(1, 12))
    N = cp * n
    rows = []
    for _ in range(draw(st.integers(1, 3))):
        left, row = N, []
        while left:
            length = draw(st.integers(1, left))
            row.append(length)
            left -= length
            if draw(st.booleans()) and left:  # leave trailing padding sometimes
                break
        rows.append(row)
    return cp, N, rows


@settings(max_examples=60, deadline=None)
@given(packed_rows(), st.sampled_from(["balanced", "zigzag", "prefix"]), st.sampled_from([None, 1, 6]),
       st.sampled_from([None, 3]))
def test_plan_partitions_every_row(case, strategy, threshold, window):
    cp, N, rows = case
    layout = DocumentLayout.from_seq_lengths(rows, N)
    plan = plan_context_parallel(layout, cp, split_threshold=threshold, window=window, strategy=strategy)
    n = N // cp
    assert plan.index.shape == (cp, len(rows), n)
    for b in range(len(rows)):  # every token exactly once, ascending on each rank
        assert sorted(plan.index[:, b].reshape(-1).tolist()) == list(range(N))
        assert bool((plan.index[:, b, 1:] > plan.index[:, b, :-1]).all())
    x = torch.randn(len(rows), N, 3)
    assert torch.equal(plan.unshard(torch.stack([plan.local(r, x) for r in range(cp)])), x)
    assert plan.rank_costs().sum() == sum(attention_cost(0, L, window) for row in rows for L in _row_docs(row, N))


def test_short_documents_stay_whole():
    rows = [[30, 6, 3, 5, 4], [3, 2, 17, 6, 4]]  # row 1 ends with 16 tokens of padding (a document too)
    layout = DocumentLayout.from_seq_lengths(rows, 48)
    plan = plan_context_parallel(layout, 2, split_threshold=8)
    owner = torch.empty(2, 48, dtype=torch.long)
    for r in range(2):
        owner.scatter_(1, plan.index[r], r)
    for b, row in enumerate(rows):
        start = 0
        for L in _row_docs(row, 48):
            ranks = owner[b, start:start + L].unique().numel()
            assert ranks == (2 if L >= 8 else 1), (b, start, L)
            start += L


def _row_docs(row, N):
    return row + ([N - sum(row)] if sum(row) < N else [])


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_zigzag_balances_one_long_document(cp):
    """One document of 2 * cp * 5 tokens: zig-zag gives every rank the same work; a prefix split
    gives the last rank more than cp times the first rank's."""
    layout = DocumentLayout.from_seq_lengths([[2 * cp * 5]], 2 * cp * 5)
    costs = plan_context_parallel(layout, cp).rank_costs()[0]
    assert costs.max() == costs.min()
    prefix = plan_context_parallel(layout, cp, strategy="prefix").rank_costs()[0]
    assert prefix.max() > cp * prefix.min()


def test_shift_labels_never_crosses_a_document():
    labels = torch.arange(10, 16)[None]
    doc = torch.tensor([[0, 0, 1, 1, 1, 2]])
    assert shift_labels(labels, doc).tolist() == [[11, -100, 13, 14, -100, -100]]


@pytest.mark.parametrize("causal, window", [(True, None), (True, 3), (False, None)])
@pytest.mark.parametrize("cp", [2, 3])
def test_rank_attention_equals_full_row(cp, causal, window):
    """Each rank's queries against the gathered keys (dense mask, and the varlen pieces emulated on
    CPU with bottom-right causal masks) equal those queries' rows of full-row packed attention."""
    torch.manual_seed(0)
    rows = [[13, 2, 5, 4], [3, 9, 12]]
    N = 24
    layout = DocumentLayout.from_seq_lengths(rows, N, causal=causal)
    plan = plan_context_parallel(layout, cp, split_threshold=6)
    H, Hkv, D = 4, 2, 8
    q, k, v = torch.randn(2, H, N, D), torch.randn(2, Hkv, N, D), torch.randn(2, Hkv, N, D)
    spec = AttentionSpec(scale=D ** -0.5)
    full = eager_attention(q, k, v, layout.dense_mask(window), spec, False)  # [B, N, H, D]
    keys = plan.index.permute(1, 0, 2).reshape(2, -1)  # gathered order (rank-major)
    k_all = torch.gather(k, 2, keys[:, None, :, None].expand(-1, Hkv, -1, D))
    v_all = torch.gather(v, 2, keys[:, None, :, None].expand(-1, Hkv, -1, D))
    worst_dense = worst_pieces = worst_control = 0.0
    for r in range(cp):
        idx = plan.index[r]
        q_r = torch.gather(q, 2, idx[:, None, :, None].expand(-1, H, -1, D))
        want = torch.gather(full, 1, idx[:, :, None, None].expand(-1, -1, H, D))
        g = lambda t, i: torch.gather(t, 1, i)  # noqa: E731
        mask = dense_cp_mask(g(plan.doc_ids, idx), g(plan.position_ids, idx), g(plan.doc_ids, keys),
                             g(plan.position_ids, keys), causal=causal, window=window)
        worst_dense = max(worst_dense, rel_err(eager_attention(q_r, k_all, v_all, mask, spec, False), want))
        got, control = _pieces_attention(q_r, k_all, v_all, plan.index, r, plan, causal, window, spec)
        worst_pieces = max(worst_pieces, rel_err(got, want))
        worst_control = max(worst_control, rel_err(control, want))
    assert worst_dense < 1e-6 and worst_pieces < 1e-6
    if causal:
        assert worst_control > 1e-2  # top-left causal alignment of the pieces is wrong, and detected


def _pieces_attention(q_r, k_all, v_all, index, rank, plan, causal, window, spec):
    """What varlen_attn computes from varlen_pieces, one piece at a time (bottom-right causal), and
    the same with top-left causal alignment as a control."""
    B, H, n, D = q_r.shape
    Hkv = k_all.shape[1]
    cu_q, cu_k, key_index, _, _ = varlen_pieces(index[rank], index, plan.doc_ids, plan.position_ids, causal, window)
    qf = q_r.transpose(1, 2).reshape(B * n, H, D)
    kf = k_all.transpose(1, 2).reshape(-1, Hkv, D)[key_index]
    vf = v_all.transpose(1, 2).reshape(-1, Hkv, D)[key_index]
    outs, controls = [], []
    for i in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        Lq, Lk = qe - qs, ke - ks
        qi, ki = torch.arange(Lq)[:, None] + (Lk - Lq), torch.arange(Lk)[None]
        for top_left, out in ((False, outs), (True, controls)):
            m = ki <= (qi - (Lk - Lq) if top_left else qi) if causal else torch.ones(Lq, Lk, dtype=torch.bool)
            if window is not None:
                m &= (qi - ki) < window
            piece = eager_attention(qf[qs:qe].transpose(0, 1)[None], kf[ks:ke].transpose(0, 1)[None],
                                    vf[ks:ke].transpose(0, 1)[None], m[None, None], spec, False)
            out.append(piece[0])
    return torch.cat(outs).view(B, n, H, D), torch.cat(controls).view(B, n, H, D)


def test_bad_inputs_have_clear_errors():
    layout = DocumentLayout.from_seq_lengths([[5, 2]], 7)
    with pytest.raises(PackmaskError, match=r"pad every row to a multiple of 2 \(8 tokens"):
        plan_context_parallel(layout, 2)
    with pytest.raises(PackmaskError, match="strategy must be one of"):
        plan_context_parallel(layout, 1, strategy="ring")
    general = analyse_mask(prefix_lm_mask([[3, 3]], [[2, 1]]))
    with pytest.raises(PackmaskError, match="block-diagonal"):
        plan_context_parallel(general, 2)
    with pytest.raises(PackmaskError, match="2D padding attention_mask"):
        _layout_of({"attention_mask": torch.tensor([[1, 1, 0, 0]])}, 1, 4)
    with pytest.raises(PackmaskError, match="torchrun"):
        ContextParallel(None)


@pytest.mark.multiprocess
@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_matches_one_process(world, tmp_path):
    """torchrun on gloo: logits, loss and every parameter gradient equal one process (tiny Llama MHA /
    GQA, Mistral's sliding window, a prefix split; FSDP2 and gradient checkpointing at 2 ranks, a
    data x context mesh at 4); a wrong
    split (documents see each other across ranks) is detected; bad inputs raise clear errors."""
    out = tmp_path / "results.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           str(WORKER), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert "crash" not in results, results["crash"]["traceback"]
    exact = ["llama", "llama_gqa_zigzag", "mistral_window", "llama_prefix_split"]
    exact += ["mesh_data2_context2"] if world == 4 else ["fsdp2_llama", "llama_gradient_checkpointing"]
    for case in exact:
        r = results[case]
        assert max(r["logits"], r["loss"], r["grads"]) <= 1e-5, (case, r)
    control = results["control_documents_see_each_other"]
    assert control["logits"] > 1e-2 and control["grads"] > 1e-2, control
    for case in ("error_not_divisible", "error_recurrent_family", "error_different_batches",
                 "error_layout_not_forwarded", "error_not_packmask"):
        assert results[case]["ok"], (case, results[case])


@pytest.mark.cuda
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_varlen_pieces_on_cuda(window, kv_heads):
    """The CUDA path (torch varlen_attn, cu_seqlens_q != cu_seqlens_k, bottom-right causal, GQA) in
    bf16: each rank's queries vs the gathered keys are as close to fp32 full-row attention as
    packmask's own varlen backend on the whole row is."""
    from packmask.backends.varlen import varlen_attention, varlen_pieces_attention
    torch.manual_seed(0)
    rows, N, cp, H, D = [[700, 90, 130, 104], [33, 611, 380]], 1024, 4, 4, 64
    layout = DocumentLayout.from_seq_lengths(rows, N, device="cuda")
    plan = plan_context_parallel(layout, cp, split_threshold=100, window=window)
    q, k, v = (torch.randn(2, h, N, D, device="cuda") for h in (H, kv_heads, kv_heads))
    spec = AttentionSpec(scale=D ** -0.5, sliding_window=window)
    full = eager_attention(q, k, v, layout.dense_mask(window), spec, False)
    bf = [t.bfloat16() for t in (q, k, v)]
    budget = rel_err(varlen_attention(*bf, layout, spec).float(), full)
    index = plan.index.cuda()
    keys = index.permute(1, 0, 2).reshape(2, -1)
    k_all, v_all = (torch.gather(t, 2, keys[:, None, :, None].expand(-1, kv_heads, -1, D)) for t in bf[1:])
    for r in range(cp):
        idx = index[r]
        q_r = torch.gather(bf[0], 2, idx[:, None, :, None].expand(-1, H, -1, D))
        cu_q, cu_k, key_index, max_q, max_k = varlen_pieces(idx, index, plan.doc_ids.cuda(), plan.position_ids.cuda(),
                                                            True, window)
        out = varlen_pieces_attention(q_r, k_all, v_all, cu_q, cu_k, key_index, max_q, max_k, scale=spec.scale,
                                      sliding_window=window)
        want = torch.gather(full, 1, idx[:, :, None, None].expand(-1, -1, H, D))
        assert rel_err(out.view(2, -1, H, D).float(), want) <= 2 * budget + 1e-3, r
