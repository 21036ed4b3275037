"""The cudnn backend: exactness on a GPU (cuda-marked), choice and refusal paths on the CPU.

GPU tests compare forward output and q/k/v gradients with an fp32 per-document reference; the bound
is the bf16 floor that torch's varlen kernel reaches on the same inputs (x1.5, plus 1e-3). A control
with one document boundary moved must fail that bound.
"""
import pytest
import torch

from packmask.backends import cudnn as cudnn_backend
from packmask.backends import AttentionSpec
from packmask.layout import DocumentLayout, GeneralLayout

needs_cudnn = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _qkv(B, H, Hkv, N, D, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def make(h):  # [B, h, N, D] as transformers hands it over: a transposed [B, N, h, D]
        return torch.randn(B, N, h, D, device="cuda", generator=g).to(torch.bfloat16).transpose(1, 2)
    q, k, v = make(H), make(Hkv), make(Hkv)
    do = torch.randn(B, N, H, D, device="cuda", generator=g).to(torch.bfloat16)
    return q, k, v, do


def _reference(q, k, v, do, lengths_per_row, scale, causal=True, window=None):
    """fp32 attention run on every document alone; returns out [B, N, H, D] and grads."""
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    rows = []
    for b, lengths in enumerate(lengths_per_row):
        parts, s = [], 0
        for n in lengths:
            qd, kd, vd = qf[b, :, s:s + n], kf[b, :, s:s + n], vf[b, :, s:s + n]
            kd, vd = kd.repeat_interleave(rep, 0), vd.repeat_interleave(rep, 0)
            scores = qd @ kd.transpose(-1, -2) * scale
            i = torch.arange(n, device=q.device)
            allowed = torch.ones(n, n, dtype=torch.bool, device=q.device)
            if causal:
                allowed &= i[:, None] >= i[None, :]
            if window is not None:
                allowed &= (i[:, None] - i[None, :]) < window
            scores = scores.masked_fill(~allowed, float("-inf"))
            parts.append((scores.softmax(-1) @ vd).transpose(0, 1))
            s += n
        rows.append(torch.cat(parts, 0))
    out = torch.stack(rows)
    out.backward(do.float())
    return out.detach(), qf.grad, kf.grad, vf.grad


def _run(fn, q, k, v, do):
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(qq, kk, vv)
    out.backward(do)
    torch.cuda.synchronize()
    return out.detach(), qq.grad, kk.grad, vv.grad


def _rel(x, ref):
    x = x.float()
    assert not torch.isnan(x).any(), "NaN in output"
    return ((x - ref).norm() / ref.norm()).item()


def _errors(got, ref):
    return [_rel(x, r) for x, r in zip(got, ref)]


def _varlen_floor(q, k, v, do, layout, spec, ref):
    from packmask.backends.varlen import varlen_attention
    return _errors(_run(lambda a, b, c: varlen_attention(a, b, c, layout, spec), q, k, v, do), ref)


def _split(N, parts):
    """``parts`` document lengths summing to N (deterministic, uneven)."""
    if parts == 1:
        return [N]
    cuts = sorted({int(N * (i / parts) ** 1.3) for i in range(1, parts)})
    bounds = [0] + cuts + [N]
    return [b - a for a, b in zip(bounds, bounds[1:]) if b > a]


CASES = [  # (heads, kv heads, head dim)
    (4, 4, 128),
    (8, 2, 64),
    (8, 1, 128),
]


# ---------------------------------------------------------------------------------------------
# GPU: exactness against the per-document reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.cuda
@needs_cudnn
@pytest.mark.parametrize("heads", CASES, ids=lambda h: f"H{h[0]}kv{h[1]}d{h[2]}")
@pytest.mark.parametrize("docs", [1, 7])
def test_cudnn_matches_per_document_reference(heads, docs):
    assert cudnn_backend.available(), "CUDA present but the cudnn backend is not available (SM90 + frontend?)"
    H, Hkv, D = heads
    B, N = 2, 640
    lengths = [_split(N, docs), _split(N, docs + 2)]
    layout = DocumentLayout.from_seq_lengths(lengths, N, device="cuda")
    spec = AttentionSpec(scale=D ** -0.5)
    q, k, v, do = _qkv(B, H, Hkv, N, D, seed=docs * 100 + D)
    ref = _reference(q, k, v, do, lengths, spec.scale)
    got = _errors(_run(lambda a, b, c: cudnn_backend.cudnn_attention(a, b, c, layout, spec), q, k, v, do), ref)
    floor = _varlen_floor(q, k, v, do, layout, spec, ref)
    for name, e, f in zip(("out", "dq", "dk", "dv"), got, floor):
        assert e <= 1.5 * f + 1e-3, f"{name}: cudnn rel err {e:.2e} vs varlen floor {f:.2e}"


@pytest.mark.cuda
@needs_cudnn
def test_wrong_offset_is_detected():
    """Control: the same kernel with one document boundary moved by 9 tokens misses the bound."""
    H, Hkv, D, N = 4, 2, 64, 512
    lengths = [[200, 180, 132]]
    spec = AttentionSpec(scale=D ** -0.5)
    q, k, v, do = _qkv(1, H, Hkv, N, D, seed=7)
    ref = _reference(q, k, v, do, lengths, spec.scale)
    right = DocumentLayout.from_seq_lengths(lengths, N, device="cuda")
    wrong = DocumentLayout.from_seq_lengths([[209, 171, 132]], N, device="cuda")
    floor = _varlen_floor(q, k, v, do, right, spec, ref)
    bad = _errors(_run(lambda a, b, c: cudnn_backend.cudnn_attention(a, b, c, wrong, spec), q, k, v, do), ref)
    assert bad[0] > 1.5 * floor[0] + 1e-3 and bad[0] > 1e-2, f"moved boundary went unnoticed: {bad[0]:.2e}"


@pytest.mark.cuda
@needs_cudnn
def test_one_graph_serves_every_split_and_window_and_bidirectional():
    H, Hkv, D, N = 4, 2, 128, 768
    spec = AttentionSpec(scale=D ** -0.5)
    q, k, v, do = _qkv(1, H, Hkv, N, D, seed=3)
    first = DocumentLayout.from_seq_lengths([_split(N, 5)], N, device="cuda")
    cudnn_backend.cudnn_attention(q, k, v, first, spec)
    graphs = len(cudnn_backend._graphs)
    for lengths in ([_split(N, 3)], [[N]], [_split(N, 8)]):  # all fit in 8 slots: no new graph
        layout = DocumentLayout.from_seq_lengths(lengths, N, device="cuda")
        ref = _reference(q, k, v, do, lengths, spec.scale)
        got = _errors(_run(lambda a, b, c: cudnn_backend.cudnn_attention(a, b, c, layout, spec), q, k, v, do), ref)
        floor = _varlen_floor(q, k, v, do, layout, spec, ref)
        assert all(e <= 1.5 * f + 1e-3 for e, f in zip(got, floor)), (lengths, got, floor)
    assert len(cudnn_backend._graphs) == graphs + 1  # + the backward graph, built once
    # sliding window (transformers' convention: 0 <= pos_q - pos_k < window)
    lengths = [_split(N, 3)]
    layout = DocumentLayout.from_seq_lengths(lengths, N, device="cuda")
    wspec = AttentionSpec(scale=D ** -0.5, sliding_window=64)
    ref = _reference(q, k, v, do, lengths, spec.scale, window=64)
    got = _errors(_run(lambda a, b, c: cudnn_backend.cudnn_attention(a, b, c, layout, wspec), q, k, v, do), ref)
    floor = _varlen_floor(q, k, v, do, layout, wspec, ref)
    assert all(e <= 1.5 * f + 1e-3 for e, f in zip(got, floor)), ("window", got, floor)
    # bidirectional documents (encoders)
    enc = DocumentLayout.from_seq_lengths(lengths, N, device="cuda", causal=False)
    ref = _reference(q, k, v, do, lengths, spec.scale, causal=False)
    got = _errors(_run(lambda a, b, c: cudnn_backend.cudnn_attention(a, b, c, enc, spec), q, k, v, do), ref)
    floor = _varlen_floor(q, k, v, do, enc, spec, ref)
    assert all(e <= 1.5 * f + 1e-3 for e, f in zip(got, floor)), ("bidirectional", got, floor)


@pytest.mark.cuda
@needs_cudnn
def test_deterministic_backward_is_bitwise_repeatable():
    H, Hkv, D, N = 8, 2, 64, 1024
    layout = DocumentLayout.from_seq_lengths([_split(N, 4)], N, device="cuda")
    spec = AttentionSpec(scale=D ** -0.5)
    q, k, v, do = _qkv(1, H, Hkv, N, D, seed=11)
    cudnn_backend.set_deterministic(True)
    try:
        a = _run(lambda x, y, z: cudnn_backend.cudnn_attention(x, y, z, layout, spec), q, k, v, do)
        b = _run(lambda x, y, z: cudnn_backend.cudnn_attention(x, y, z, layout, spec), q, k, v, do)
    finally:
        cudnn_backend.set_deterministic(False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.cuda
@needs_cudnn
def test_compiled_call_matches_eager_without_recompiling():
    import torch._dynamo
    H, Hkv, D, N = 4, 2, 64, 512
    spec = AttentionSpec(scale=D ** -0.5)
    q, k, v, do = _qkv(1, H, Hkv, N, D, seed=5)

    def f(a, b, c, layout):
        return cudnn_backend.cudnn_attention(a, b, c, layout, spec)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=None)
    torch._dynamo.reset()
    for lengths in ([_split(N, 3)], [_split(N, 6)]):
        layout = DocumentLayout.from_seq_lengths(lengths, N, device="cuda")
        torch._dynamo.maybe_mark_dynamic(layout.cu_seqlens, 0)
        eager = _run(lambda a, b, c: f(a, b, c, layout), q, k, v, do)
        comp = _run(lambda a, b, c: compiled(a, b, c, layout), q, k, v, do)
        assert all(torch.equal(x, y) for x, y in zip(eager, comp))


# ---------------------------------------------------------------------------------------------
# CPU: refusals, availability and the cost-based choice (GPU parts mocked at the boundary)
# ---------------------------------------------------------------------------------------------

from packmask import backends  # noqa: E402
from packmask.backends import costs, describe_choice  # noqa: E402
from packmask.errors import PackmaskError  # noqa: E402


def _layout(lengths_per_row, N):
    return DocumentLayout.from_seq_lengths(lengths_per_row, N)


def _q(D=64, dtype=torch.bfloat16, N=12):
    return torch.zeros(1, 4, N, D, dtype=dtype)


@pytest.fixture
def gpu_here(monkeypatch):
    """Pretend the GPU boundary says yes: SM90 with the frontend (cudnn), CUDA kernels present (varlen, flex)."""
    monkeypatch.setattr(cudnn_backend, "available", lambda device=None: True)
    from packmask.backends import flex, varlen
    monkeypatch.setattr(varlen, "varlen_available", lambda: True)
    for module in (varlen, flex):  # their own rules, asked about a CUDA tensor of q's dtype and shape
        monkeypatch.setattr(module, "refusal", lambda layout, spec, q, training, _own=module.refusal:
                            _own(layout, spec, _OnCuda(q), training))


class _OnCuda:
    """What a refusal reads of q (is_cuda, device, dtype, shape), as if q lived on a GPU."""

    is_cuda = True
    device = torch.device("cuda", 0)

    def __init__(self, q):
        self.dtype, self.shape = q.dtype, q.shape


def test_cudnn_refuses_what_it_cannot_do_exactly(monkeypatch):
    monkeypatch.setattr(cudnn_backend, "available", lambda device=None: True)
    docs = _layout([[5, 7]], 12)
    spec = AttentionSpec(scale=0.125)
    assert cudnn_backend.refusal(docs, spec, _q(), training=True) is None
    general = GeneralLayout(torch.ones(1, 12, 12, dtype=torch.bool).tril(), torch.zeros(1, 12, dtype=torch.long),
                            torch.arange(12)[None])
    cases = {
        "block-diagonal": (general, spec, _q(), True),
        "fp16/bf16": (docs, spec, _q(dtype=torch.float32), True),
        "head dim": (docs, spec, _q(D=256), True),
        "softcapping": (docs, AttentionSpec(scale=0.125, softcap=30.0), _q(), True),
        "dropout": (docs, AttentionSpec(scale=0.125, dropout=0.1), _q(), True),
        "sinks": (docs, AttentionSpec(scale=0.125, sinks=torch.zeros(4)), _q(), True),
        "one-sided": (_layout([[5, 7]], 12).__class__.from_seq_lengths([[5, 7]], 12, causal=False),
                      AttentionSpec(scale=0.125, sliding_window=3, is_causal=False), _q(), True),
    }
    for word, args in cases.items():
        why = cudnn_backend.refusal(*args)
        assert why is not None and word in why, (word, why)
    # dropout only matters when training
    assert cudnn_backend.refusal(docs, AttentionSpec(scale=0.125, dropout=0.1), _q(), training=False) is None


def test_without_the_extra_nothing_changes(monkeypatch):
    import sys
    cudnn_backend._frontend.cache_clear()
    monkeypatch.setitem(sys.modules, "cudnn", None)  # `import cudnn` raises ImportError
    try:
        assert cudnn_backend._frontend() is None
        assert not cudnn_backend.available()
        assert "cudnn" not in backends.available_backends()
        layout, spec = _layout([[5, 7]], 12), AttentionSpec(scale=0.125)
        assert backends.choose_backend(layout, spec, _q(), training=True) == "sdpa"
        with backends.backend("cudnn"), pytest.raises(PackmaskError, match=r"packmask\[cudnn\]"):
            backends.choose_backend(layout, spec, _q(), training=True)
    finally:
        cudnn_backend._frontend.cache_clear()


TABLE = {"buckets": [128, 1024], "row_tokens": 16384, "setup_ms": {"flex": 2.0},
         "rates": {"64": {"cudnn": [30.0, 300.0], "varlen": [40.0, 200.0], "flex": [35.0, 250.0]},
                   "128": {"cudnn": [40.0, 400.0], "varlen": [40.0, 250.0], "flex": [40.0, 300.0]}}}


@pytest.fixture
def table_here(tmp_path, monkeypatch):
    path = tmp_path / "costs.json"
    monkeypatch.setenv("PACKMASK_COST_TABLE", str(path))
    costs.write_table("Fake GPU", TABLE)
    monkeypatch.setattr(costs, "_device_name", lambda q: "Fake GPU")
    yield path
    costs.load_table.cache_clear()


def test_cost_table_written_atomically_and_merged(table_here):
    costs.write_table("Other GPU", dict(TABLE, buckets=[64, 512]))
    import json
    data = json.loads(table_here.read_text())
    assert sorted(data["devices"]) == ["Fake GPU", "Other GPU"]
    assert costs.load_table("Fake GPU")["buckets"] == [128, 1024]
    assert not list(table_here.parent.glob("*.tmp*"))


def test_dispatch_takes_the_cheapest_kernel_by_the_measured_table(gpu_here, table_here):
    spec = AttentionSpec(scale=0.125)
    long_docs = _layout([[2048, 2048]], 4096)
    short_docs = _layout([[128] * 32], 4096)
    q = _q(N=4096)
    assert backends.choose_backend(long_docs, spec, q, training=True) == "cudnn"
    assert backends.choose_backend(short_docs, spec, q, training=True) == "varlen"
    info = describe_choice(short_docs, spec, q)
    assert info["backend"] == "varlen" and info["candidates"][:3] == ["cudnn", "varlen", "flex"]
    est = info["estimated_ms"]
    assert est["varlen"] < est["cudnn"] < est["flex"]  # flex pays its BlockMask build (setup_ms)
    # a kernel that refuses is never chosen, however cheap the table says it is
    assert backends.choose_backend(long_docs, AttentionSpec(scale=0.125, softcap=5.0), q, training=True) == "flex"
    # a forced backend wins over the table
    with backends.backend("varlen"):
        assert backends.choose_backend(long_docs, spec, q, training=True) == "varlen"


def test_without_a_table_the_dispatch_order_decides(gpu_here, monkeypatch, tmp_path):
    monkeypatch.setenv("PACKMASK_COST_TABLE", str(tmp_path / "none.json"))
    monkeypatch.setattr(costs, "_device_name", lambda q: "GPU nobody calibrated")
    costs.load_table.cache_clear()
    try:
        info = describe_choice(_layout([[128] * 32], 4096), AttentionSpec(scale=0.125), _q(N=4096))
        assert info["backend"] == "cudnn" and "calibrate" in info["reason"]
    finally:
        costs.load_table.cache_clear()


def test_shipped_table_covers_h100():
    table = costs._read(costs._SHIPPED)["devices"]["NVIDIA H100 80GB HBM3"]
    assert len(table["buckets"]) == len(table["rates"]["128"]["cudnn"]) and table["rates"]["64"]["varlen"][0] > 0
