"""Context parallelism's pieces: a document's keys start where the document starts (from its ids), never
at ``row index - position`` (which assumed positions start at 0 and, for offset positions, reached
into the previous document); and the rank's call runs through packmask's one dispatcher."""
from __future__ import annotations

import pytest
import torch

from packmask.backends import AttentionSpec, attend, choose_backend
from packmask.backends import varlen as varlen_backend
from packmask.backends.eager import eager_attention
from packmask.distributed.cp_attention import dense_cp_mask, varlen_pieces
from packmask.distributed.cp_plan import plan_context_parallel
from packmask.layout import DocumentLayout
from packmask.layout_pieces import KeyPieces, PiecesLayout
from packmask.testing import rel_err

ROWS, N, CP = [[9, 3, 6, 6], [5, 11, 8]], 24, 2


def mask_of_pieces(cu_q, cu_k, key_index, B, n, K, causal=True):
    """``[B, n, K]``: what varlen computes from the pieces (bottom-right aligned causal)."""
    m = torch.zeros(B * n, B * K, dtype=torch.bool)
    for i in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        Lq, Lk = qe - qs, ke - ks
        sees = torch.arange(Lk)[None] <= torch.arange(Lq)[:, None] + (Lk - Lq) if causal else torch.ones(Lq, Lk).bool()
        m[qs:qe][:, key_index[ks:ke]] = sees
    return torch.stack([m[b * n:(b + 1) * n, b * K:(b + 1) * K] for b in range(B)])


def rank_inputs(plan, rank, positions):
    idx, keys = plan.index[rank], plan.index.permute(1, 0, 2).reshape(plan.batch_size, -1)
    g = lambda t, i: torch.gather(t, 1, i)  # noqa: E731
    return idx, dense_cp_mask(g(plan.doc_ids, idx), g(positions, idx), g(plan.doc_ids, keys), g(positions, keys))[:, 0]


@pytest.mark.parametrize("offset", [0, 2, 7], ids=["from-0", "roberta-style", "continued-document"])
def test_pieces_equal_the_dense_mask_whatever_the_first_position(offset):
    """Positions that start at ``offset`` (RoBERTa-style models, a row continuing a split document):
    the pieces still see exactly their document. The old ``doc_start = g_first - pos_first`` moved every
    key range ``offset`` tokens back, into the previous document (or before the row)."""
    plan = plan_context_parallel(DocumentLayout.from_seq_lengths(ROWS, N), CP, split_threshold=5)
    positions = plan.position_ids + offset
    n = N // CP
    for rank in range(CP):
        idx, dense = rank_inputs(plan, rank, positions)
        cu_q, cu_k, key_index, _, _ = varlen_pieces(idx, plan.index, plan.doc_ids, positions)
        assert torch.equal(mask_of_pieces(cu_q, cu_k, key_index, 2, n, N), dense), rank
    # control: the comparison sees a wrong document split (two documents of row 0 merged)
    merged = plan.doc_ids.clone()
    merged[0][merged[0] == 1] = 0
    idx, dense = rank_inputs(plan, 0, positions)
    cu_q, cu_k, key_index, _, _ = varlen_pieces(idx, plan.index, merged)
    assert not torch.equal(mask_of_pieces(cu_q, cu_k, key_index, 2, n, N), dense)


def _varlen_contract(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """torch's varlen_attn in plain math, piece by piece (bottom-right aligned causal band)."""
    out = torch.zeros_like(q)
    for i in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        qi = torch.arange(qe - qs)[:, None] + (ke - ks) - (qe - qs)
        ki = torch.arange(ke - ks)[None]
        allowed = torch.ones(qe - qs, ke - ks, dtype=torch.bool)
        if window_size[1] == 0:
            allowed &= ki <= qi
        if window_size[0] >= 0:
            allowed &= qi - ki <= window_size[0]
        ks_, vs_ = k[ks:ke], v[ks:ke]
        rep = q.shape[1] // k.shape[1]
        ks_, vs_ = ks_.repeat_interleave(rep, 1), vs_.repeat_interleave(rep, 1)
        s = torch.einsum("qhd,khd->hqk", q[qs:qe], ks_) * scale
        out[qs:qe] = torch.einsum("hqk,khd->qhd", s.masked_fill(~allowed, float("-inf")).softmax(-1), vs_)
    return out


@pytest.mark.parametrize("window", [None, 3])
def test_a_rank_call_runs_through_the_dispatcher(fake_varlen_kernel, window):
    """The rank's PiecesLayout: the dispatcher's dense path (sdpa on CPU) and the varlen kernel's glue
    (torch's kernel replaced by its contract) both equal the rank's rows of full-row attention."""
    torch.manual_seed(0)
    fake_varlen_kernel(_varlen_contract)
    layout = DocumentLayout.from_seq_lengths(ROWS, N)
    plan = plan_context_parallel(layout, CP, split_threshold=5)
    H, Hkv, D, n = 4, 2, 8, N // CP
    q, k, v = torch.randn(2, H, N, D), torch.randn(2, Hkv, N, D), torch.randn(2, Hkv, N, D)
    spec = AttentionSpec(scale=D ** -0.5, sliding_window=window)
    full = eager_attention(q, k, v, layout.dense_mask(window), spec, False)
    keys = plan.index.permute(1, 0, 2).reshape(2, -1)
    k_all, v_all = (torch.gather(t, 2, keys[:, None, :, None].expand(-1, Hkv, -1, D)) for t in (k, v))
    for rank in range(CP):
        idx = plan.index[rank]
        q_r = torch.gather(q, 2, idx[:, None, :, None].expand(-1, H, -1, D))
        want = torch.gather(full, 1, idx[:, :, None, None].expand(-1, -1, H, D))
        g = lambda t, i: torch.gather(t, 1, i)  # noqa: E731
        rank_layout = PiecesLayout(
            lambda: KeyPieces(*varlen_pieces(idx, plan.index, plan.doc_ids, None, True, window)),
            lambda: dense_cp_mask(g(plan.doc_ids, idx), g(plan.position_ids, idx), g(plan.doc_ids, keys),
                                  g(plan.position_ids, keys), window=window)[:, 0], 2, n, N, True, window)
        assert choose_backend(rank_layout, spec, q_r, False) == "sdpa"
        assert rel_err(attend(q_r, k_all, v_all, rank_layout, spec), want) < 1e-5
        assert rel_err(varlen_backend.run(q_r, k_all, v_all, rank_layout, spec, False), want) < 1e-5
        # control: the keys in another order (not the gathered order the pieces index) are far off
        shuffled = k_all.flip(2)
        assert rel_err(varlen_backend.run(q_r, shuffled, v_all, rank_layout, spec, False), want) > 1e-2
