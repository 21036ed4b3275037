"""Triton kernels of the one-launch tree attention (:mod:`packmask.backends.tree_triton`).

FlashAttention-2 style: the forward keeps a running max / sum per query row and saves the
log-sum-exp; the backward recomputes the probabilities from it (``dk, dv`` per key block looping
over the query heads of its kv group, ``dq`` per query block; no atomics).

The mask is evaluated per element from three small vectors, never an N×K mask: every query row has
a preorder *rank*; every key column ``c`` the half-open rank range ``[klo[c], khi[c])`` of the
queries that see it (a tree token: its subtree; a visible cache column: every query; an invisible
column: the empty range). A query sees a key iff ``klo[c] <= rank[q] < khi[c]`` (and, with a
sliding window, ``pos[q] - kpos[c] < window``). Which key blocks a query block visits comes from a
tile list (counts and indices, like a BlockMask), so the kernel reads only the ``<= depth`` key
intervals each query block needs.

Launched only where triton is installed (CUDA, or ``TRITON_INTERPRET=1`` on CPU).
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
    jit = triton.jit
except ImportError:  # imported without triton (doctest collection): defined, never launched
    tl = None

    def jit(fn):
        return fn

# a jit function may read only constexpr globals (the interpreter does not check this; the compiler does)
LOG2E = tl.constexpr(1.4426950408889634) if tl is not None else 1.4426950408889634


@jit
def _softcap(s, cap):
    """``cap * tanh(s / cap)`` through exp (tanh is not in every triton build / the interpreter)."""
    return cap * (1.0 - 2.0 / (tl.exp(2.0 * s / cap) + 1.0))


@jit
def _visible(qr, lo, hi, qp, kp, WINDOW: tl.constexpr):
    vis = (lo[None, :] <= qr[:, None]) & (qr[:, None] < hi[None, :])
    if WINDOW > 0:
        vis = vis & ((qp[:, None] - kp[None, :]) < WINDOW)
    return vis


@jit
def tree_fwd_kernel(Q, K, V, O, LSE, QRANK, KLO, KHI, QPOS, KPOS, TCNT, TIDX,
                    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, son, soh, sos, sls,
                    H, N, KV, D, NQB, NKB, G, NSPLIT, scale, cap,
                    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // G).to(tl.int64)
    rows = qb * BM + tl.arange(0, BM)
    dcol = tl.arange(0, BD)
    rmask = rows < N
    dmask = dcol < D
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + dcol[None, :], mask=rmask[:, None] & dmask[None, :],
                other=0.0)
    qr = tl.load(QRANK + b * N + rows, mask=rmask, other=-1)
    qp = qr
    if WINDOW > 0:
        qp = tl.load(QPOS + b * N + rows, mask=rmask, other=0)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    cnt = tl.load(TCNT + b * NQB + qb)
    split = tl.program_id(2)  # split-KV (flash-decoding): this program takes one share of the tile list
    per = (cnt + NSPLIT - 1) // NSPLIT
    first = split * per
    last = tl.minimum(cnt, first + per)
    for i in range(first, last):
        kb = tl.load(TIDX + (b * NQB + qb) * NKB + i)
        cols = kb * BN + tl.arange(0, BN)
        cmask = cols < KV
        kmask = cmask[:, None] & dmask[None, :]
        k = tl.load(K + b * skb + hk * skh + cols[:, None] * skn + dcol[None, :], mask=kmask, other=0.0)
        v = tl.load(V + b * svb + hk * svh + cols[:, None] * svn + dcol[None, :], mask=kmask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        if SOFTCAP:
            s = _softcap(s, cap)
        lo = tl.load(KLO + b * KV + cols, mask=cmask, other=0)
        hi = tl.load(KHI + b * KV + cols, mask=cmask, other=0)
        kp = lo
        if WINDOW > 0:
            kp = tl.load(KPOS + b * KV + cols, mask=cmask, other=0)
        s = tl.where(_visible(qr, lo, hi, qp, kp, WINDOW), s * LOG2E, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) / LOG2E, float("-inf"))
    tl.store(O + split * sos + b * sob + h * soh + rows[:, None] * son + dcol[None, :], out.to(O.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
    tl.store(LSE + split * sls + (b * H + h) * N + rows, lse, mask=rmask)


@jit
def tree_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, QRANK, KLO, KHI, QPOS, KPOS, TCNT, TIDX,
                         sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdn, sdh, sgb, sgh, sgn,
                         H, HKV, N, KV, D, NQB, NKB, G, scale, cap,
                         WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    kb = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    cols = kb * BN + tl.arange(0, BN)
    dcol = tl.arange(0, BD)
    cmask = cols < KV
    dmask = dcol < D
    kmask = cmask[:, None] & dmask[None, :]
    k = tl.load(K + b * skb + hk * skh + cols[:, None] * skn + dcol[None, :], mask=kmask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + cols[:, None] * svn + dcol[None, :], mask=kmask, other=0.0)
    lo = tl.load(KLO + b * KV + cols, mask=cmask, other=0)
    hi = tl.load(KHI + b * KV + cols, mask=cmask, other=0)
    kp = lo
    if WINDOW > 0:
        kp = tl.load(KPOS + b * KV + cols, mask=cmask, other=0)
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BD], tl.float32)
    cnt = tl.load(TCNT + b * NKB + kb)
    for g in range(0, G):
        h = hk * G + g
        for i in range(0, cnt):
            qb = tl.load(TIDX + (b * NKB + kb) * NQB + i)
            rows = qb * BM + tl.arange(0, BM)
            rmask = rows < N
            qmask = rmask[:, None] & dmask[None, :]
            q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + dcol[None, :], mask=qmask, other=0.0)
            do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + dcol[None, :], mask=qmask, other=0.0)
            lse = tl.load(LSE + (b * H + h) * N + rows, mask=rmask, other=0.0)
            delta = tl.load(DELTA + (b * H + h) * N + rows, mask=rmask, other=0.0)
            qr = tl.load(QRANK + b * N + rows, mask=rmask, other=-1)
            qp = qr
            if WINDOW > 0:
                qp = tl.load(QPOS + b * N + rows, mask=rmask, other=0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale
            t = s
            if SOFTCAP:
                t = _softcap(s, cap) / cap
                s = t * cap
            vis = _visible(qr, lo, hi, qp, kp, WINDOW)
            p = tl.exp(tl.where(vis, s - lse[:, None], float("-inf")))
            if IEEE:
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="ieee")
                dp = tl.dot(do, tl.trans(v), input_precision="ieee")
            else:
                dv += tl.dot(tl.trans(p.to(do.dtype)), do)
                dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            if IEEE:
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee")
            else:
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    out_off = b * sgb + hk * sgh + cols[:, None] * sgn + dcol[None, :]  # dk, dv laid out like k (same strides)
    tl.store(DK + out_off, (dk * scale).to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kmask)


@jit
def tree_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, QRANK, KLO, KHI, QPOS, KPOS, TCNT, TIDX,
                       sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdn, sdh, sgb, sgh, sgn,
                       H, N, KV, D, NQB, NKB, G, scale, cap,
                       WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // G).to(tl.int64)
    rows = qb * BM + tl.arange(0, BM)
    dcol = tl.arange(0, BD)
    rmask = rows < N
    dmask = dcol < D
    qmask = rmask[:, None] & dmask[None, :]
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + dcol[None, :], mask=qmask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + dcol[None, :], mask=qmask, other=0.0)
    lse = tl.load(LSE + (b * H + h) * N + rows, mask=rmask, other=0.0)
    delta = tl.load(DELTA + (b * H + h) * N + rows, mask=rmask, other=0.0)
    qr = tl.load(QRANK + b * N + rows, mask=rmask, other=-1)
    qp = qr
    if WINDOW > 0:
        qp = tl.load(QPOS + b * N + rows, mask=rmask, other=0)
    dq = tl.zeros([BM, BD], tl.float32)
    cnt = tl.load(TCNT + b * NQB + qb)
    for i in range(0, cnt):
        kb = tl.load(TIDX + (b * NQB + qb) * NKB + i)
        cols = kb * BN + tl.arange(0, BN)
        cmask = cols < KV
        kmask = cmask[:, None] & dmask[None, :]
        k = tl.load(K + b * skb + hk * skh + cols[:, None] * skn + dcol[None, :], mask=kmask, other=0.0)
        v = tl.load(V + b * svb + hk * svh + cols[:, None] * svn + dcol[None, :], mask=kmask, other=0.0)
        lo = tl.load(KLO + b * KV + cols, mask=cmask, other=0)
        hi = tl.load(KHI + b * KV + cols, mask=cmask, other=0)
        kp = lo
        if WINDOW > 0:
            kp = tl.load(KPOS + b * KV + cols, mask=cmask, other=0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k)) * scale
            dp = tl.dot(do, tl.trans(v))
        t = s
        if SOFTCAP:
            t = _softcap(s, cap) / cap
            s = t * cap
        p = tl.exp(tl.where(_visible(qr, lo, hi, qp, kp, WINDOW), s - lse[:, None], float("-inf")))
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        if IEEE:
            dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
        else:
            dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + b * sgb + h * sgh + rows[:, None] * sgn + dcol[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=qmask)
