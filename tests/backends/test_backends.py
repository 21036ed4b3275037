"""packmask.backends: each kernel against the eager reference, the dispatcher's choices and refusals,
and scoped backend selection (no process-global state)."""
import threading

import pytest
import torch

import packmask
from packmask import PackmaskError
from packmask.backends import AttentionSpec, attend, choose_backend, eager, requested_backend, sdpa
from packmask.backends.eager import eager_attention
from packmask.layout import DocumentLayout, analyse_mask
from packmask.testing import rel_err, tiny_model


def _qkv(B=2, H=4, Hkv=2, N=12, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, N, D, generator=g), torch.randn(B, Hkv, N, D, generator=g),
            torch.randn(B, Hkv, N, D, generator=g))


def _per_document_reference(q, k, v, seq_lengths, spec):
    """Each document alone through plain math: the ground truth for a block-diagonal layout."""
    out = torch.zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    for b, row in enumerate(seq_lengths):
        s = 0
        for n in row:
            part = slice(s, s + n)
            out[b, part] = eager_attention(q[b:b + 1, :, part], k[b:b + 1, :, part], v[b:b + 1, :, part], None, spec,
                                           False)[0]
            s += n
    return out


@pytest.mark.parametrize("spec", [
    AttentionSpec(scale=0.3),
    AttentionSpec(scale=0.3, sliding_window=3),
    AttentionSpec(scale=0.3, softcap=2.0),
    AttentionSpec(scale=0.3, is_causal=False),
    AttentionSpec(scale=0.3, is_causal=False, sliding_window=2),
    AttentionSpec(scale=0.3, sinks=torch.tensor([0.5, -1.0, 2.0, 0.0])),
], ids=["causal", "window", "softcap", "bidirectional", "bidirectional-window", "sinks"])
def test_every_cpu_backend_equals_each_document_alone(spec):
    seq_lengths = [[5, 4, 3], [7, 5]]
    q, k, v = _qkv()
    layout = DocumentLayout.from_seq_lengths(seq_lengths, 12, causal=spec.is_causal)
    expected = _per_document_reference(q, k, v, seq_lengths, spec)
    ran = 0
    for module in (sdpa, eager):
        if module.refusal(layout, spec, q, False) is None:
            assert rel_err(module.run(q, k, v, layout, spec, False), expected) < 1e-6, module.NAME
            ran += 1
    assert ran >= 1
    assert rel_err(attend(q, k, v, layout, spec), expected) < 1e-6
    # control: the same call over one undivided row is detectably different
    whole = DocumentLayout.from_seq_lengths([[12], [12]], 12, causal=spec.is_causal)
    assert rel_err(attend(q, k, v, whole, spec), expected) > 1e-2


def test_general_layout_equals_dense_masked_math():
    q, k, v = _qkv(B=1)
    mask = packmask.shared_prefix_tree_mask(4, [5, 3])[None]
    layout = analyse_mask(mask)
    spec = AttentionSpec(scale=0.3)
    expected = eager_attention(q, k, v, mask[:, None], spec, False)
    assert rel_err(attend(q, k, v, layout, spec), expected) < 1e-6


def test_dispatch_on_cpu_and_refusals():
    q, _, _ = _qkv()
    layout = DocumentLayout.from_seq_lengths([[6, 6], [12]], 12)
    assert choose_backend(layout, AttentionSpec(scale=1.0), q, False) == "sdpa"
    assert choose_backend(layout, AttentionSpec(scale=1.0, softcap=5.0), q, False) == "eager"
    assert choose_backend(layout, AttentionSpec(scale=1.0, sinks=torch.zeros(4)), q, False) == "eager"
    assert choose_backend(None, AttentionSpec(scale=1.0), q, False) == "sdpa"
    for name, spec, reason in [("varlen", AttentionSpec(scale=1.0), "CUDA"),
                               ("flex", AttentionSpec(scale=1.0), "CUDA"),
                               ("sdpa", AttentionSpec(scale=1.0, softcap=1.0), "softcapping"),
                               ("sdpa", AttentionSpec(scale=1.0, sinks=torch.zeros(4)), "sink")]:
        with packmask.backend(name), pytest.raises(PackmaskError, match=reason):
            choose_backend(layout, spec, q, False)
    with pytest.raises(PackmaskError, match="unknown backend"):
        with packmask.backend("cudnnn"):
            pass


def test_backend_context_is_scoped_and_per_thread():
    assert requested_backend() == "auto"
    seen = {}
    with packmask.backend("eager"):
        worker = threading.Thread(target=lambda: seen.setdefault("thread", requested_backend()))
        worker.start()
        worker.join()
        with packmask.backend("sdpa"):
            assert requested_backend() == "sdpa"
        assert requested_backend() == "eager"
    assert requested_backend() == "auto" and seen["thread"] == "auto"


def test_forced_backend_that_lacks_a_feature_refuses_in_a_model():
    model = tiny_model("gemma2", "packmask")
    with packmask.backend("sdpa"), pytest.raises(PackmaskError, match="softcapping"):
        model(input_ids=torch.randint(1, 128, (1, 8)), attention_mask=packmask.block_diagonal_mask([[3, 5]], 8))


def test_per_model_backend_setting(monkeypatch):
    model = tiny_model("llama", "packmask")
    other = tiny_model("llama", "packmask")
    packmask.enable(model, backend="eager")
    calls = []
    original = eager.run
    monkeypatch.setattr(eager, "run", lambda *a, **k: calls.append(1) or original(*a, **k))
    mask = packmask.block_diagonal_mask([[3, 5]], 8)
    ids = torch.randint(1, 128, (1, 8))
    expected = other(input_ids=ids, attention_mask=mask).logits
    assert not calls  # the other model dispatched on its own (sdpa on CPU)
    assert rel_err(model(input_ids=ids, attention_mask=mask).logits, expected) < 1e-5
    assert len(calls) == model.config.num_hidden_layers
    with pytest.raises(PackmaskError, match="unknown backend"):
        packmask.enable(other, backend="fast")


@pytest.mark.parametrize("causal", [True, False])
def test_document_block_mask_equals_create_block_mask_on_cpu(causal):
    """The BlockMask built from document offsets (O(blocks²), no element-wise pass) covers exactly the
    tiles flex's own create_block_mask finds, its full tiles are truly full, and its mask_mod is the
    document mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    from packmask.backends.flex import document_block_mask

    seq_lengths = [[40, 7, 1, 80], [128], [16, 16, 64, 32]]
    layout = DocumentLayout.from_seq_lengths(seq_lengths, 128, causal=causal)
    ours = document_block_mask(layout, "cpu", block=16)
    dense = layout.dense_mask()[:, 0]

    def mask_mod(b, h, q, k):
        return dense[b, q, k]

    reference = create_block_mask(mask_mod, 3, None, 128, 128, device="cpu", BLOCK_SIZE=16)
    assert torch.equal(ours.to_dense(), reference.to_dense())
    # every tile we call full is full in the element mask, and the element mask_mod is the layout's
    full = torch.zeros(3, 8, 8, dtype=torch.bool)
    for b in range(3):
        for qb in range(8):
            n = int(ours.full_kv_num_blocks[b, 0, qb])
            full[b, qb, ours.full_kv_indices[b, 0, qb, :n].long()] = True
    tiles = dense.view(3, 8, 16, 8, 16).all(-1).all(2)
    assert not bool((full & ~tiles).any())
    q, k = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    for b in range(3):
        assert torch.equal(ours.mask_mod(torch.tensor(b), 0, q, k), dense[b])
    # control: a layout with one boundary moved gives a different tile set
    moved = DocumentLayout.from_seq_lengths([[20, 28, 80], [128], [16, 16, 64, 32]], 128, causal=causal)
    assert not torch.equal(document_block_mask(moved, "cpu", block=16).to_dense(), reference.to_dense())


def test_scoped_backend_survives_checkpoint_recomputation():
    """Activation checkpointing recomputes layers during backward — on CUDA in autograd's own thread,
    outside the ``with packmask.backend(...)`` block. The recomputation must use the kernel the
    forward used (else torch.utils.checkpoint raises: different tensors saved), and the gradients
    must equal the run without checkpointing."""
    torch.manual_seed(0)
    reference = tiny_model("llama", "packmask").train()
    model = tiny_model("llama", "packmask").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(1, 128, (2, 12))
    mask = packmask.block_diagonal_mask([[5, 7], [12]], 12)
    for m in (reference, model):
        with packmask.backend("eager"):  # sdpa would be auto's choice on CPU
            loss = m(input_ids=ids, attention_mask=mask, labels=ids).loss
        worker = threading.Thread(target=loss.backward)  # like CUDA's autograd thread: no context
        worker.start()
        worker.join()
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        assert a.grad is not None and b.grad is not None, name
        assert rel_err(b.grad, a.grad) < 1e-5, name


def test_scoped_backend_does_not_leak_into_a_later_forward_reusing_the_mask():
    """The block is remembered on the layout cached on the mask tensor (for checkpoint recomputation);
    a later forward outside the block with the same mask must dispatch afresh, not run the block's
    kernel — here sdpa, which cannot softcap, so gemma2 was refused outside any block."""
    llama, gemma = tiny_model("llama", "packmask").eval(), tiny_model("gemma2", "packmask").eval()
    mask = packmask.block_diagonal_mask([[3, 5]], 8)
    ids = torch.randint(1, 128, (1, 8))
    with torch.no_grad():
        with packmask.backend("sdpa"):
            llama(input_ids=ids, attention_mask=mask)
            with pytest.raises(PackmaskError, match="softcapping"):  # control: inside the block it refuses
                gemma(input_ids=ids, attention_mask=mask)
        expected = gemma(input_ids=ids, attention_mask=packmask.block_diagonal_mask([[3, 5]], 8)).logits
        assert rel_err(gemma(input_ids=ids, attention_mask=mask).logits, expected) < 1e-5


@pytest.mark.parametrize("layout_causal", [True, False])
@pytest.mark.parametrize("layer_causal", [True, False])
@pytest.mark.parametrize("window", [None, 3])
def test_varlen_window_band_equals_the_dense_mask(layout_causal, layer_causal, window):
    """varlen's (left, right) band hides exactly the keys the dense-mask backends hide. It used to take
    the window's side from the layout, not the layer: a decoder's sliding window over bidirectional
    documents became two-sided on varlen while sdpa / eager / flex kept it one-sided."""
    from packmask.backends.varlen import window_size
    from packmask.layout import DocumentLayout
    layout = DocumentLayout.from_seq_lengths([[6, 2], [8]], 8, causal=layout_causal)
    spec = AttentionSpec(scale=1.0, sliding_window=window, is_causal=layer_causal)
    left, right = window_size(layout, spec)
    doc, pos = layout.doc_ids, layout.position_ids
    delta = pos[:, :, None] - pos[:, None, :]  # query minus key
    band = (doc[:, :, None] == doc[:, None, :]) & ((left < 0) | (delta <= left)) & ((right < 0) | (-delta <= right))
    expected = layout.dense_mask(window, bidirectional_window=spec.bidirectional_window)[:, 0]
    assert torch.equal(band, expected)


def _reference_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """torch's varlen_attn contract in plain math (a loop per piece; test only): bottom-right aligned
    band ``(left, right)``, -1 unbounded; kv heads shared only with ``enable_gqa``."""
    out = torch.empty_like(q)
    left, right = window_size
    for i in range(len(cu_q) - 1):
        qs, ks, vs = q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
        if ks.shape[1] != qs.shape[1]:
            assert enable_gqa, "kv heads differ without enable_gqa"
            ks, vs = (t.repeat_interleave(qs.shape[1] // t.shape[1], 1) for t in (ks, vs))
        nq, nk = qs.shape[0], ks.shape[0]
        delta = torch.arange(nk - nq, nk)[:, None] - torch.arange(nk)[None]
        allowed = ((left < 0) | (delta <= left)) & ((right < 0) | (-delta <= right))
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[cu_q[i]:cu_q[i + 1]] = torch.einsum("hqk,khd->qhd", probs, vs)
    return out


@pytest.mark.parametrize("gqa_route", ["enable_gqa", "expand"])
@pytest.mark.parametrize("causal,layer_causal,window", [(True, True, None), (True, True, 3), (False, False, 3),
                                                         (False, True, 3), (False, False, None)])
def test_varlen_glue_equals_eager_on_cpu(monkeypatch, fake_varlen_kernel, gqa_route, causal, layer_causal, window):
    """The varlen backend's glue (flattening, window band, GQA routes) equals the eager backend, with
    torch's kernel replaced by its contract in plain math (the kernel itself is CUDA-only:
    tests/backends/test_backends_cuda.py). Control: a band taken from the layout, as before, differs."""
    from packmask.backends import varlen as vl
    from packmask.layout import DocumentLayout
    fake_varlen_kernel(_reference_varlen_attn)
    params = vl.varlen_params() - ({"enable_gqa"} if gqa_route == "expand" else set())
    monkeypatch.setattr(vl, "varlen_params", lambda: params)
    torch.manual_seed(0)
    layout = DocumentLayout.from_seq_lengths([[6, 2], [3, 5]], 8, causal=causal)
    q, k, v = torch.randn(2, 4, 8, 8), torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)
    spec = AttentionSpec(scale=0.3, sliding_window=window, is_causal=layer_causal)
    expected = eager.run(q, k, v, layout, spec, False)
    assert rel_err(vl.varlen_attention(q, k, v, layout, spec, native_gqa=False), expected) < 1e-5
    if not causal and layer_causal and window:  # control: the old two-sided band on a causal layer
        monkeypatch.setattr(vl, "window_size", lambda layout, spec: (window - 1, window - 1))
        assert rel_err(vl.varlen_attention(q, k, v, layout, spec, native_gqa=False), expected) > 1e-2


@pytest.mark.parametrize("window", [None, 2])
def test_tree_varlen_glue_equals_eager_on_cpu(fake_varlen_kernel, window):
    """Tree pieces with gathered keys through the shared varlen call equal eager (kernel as above)."""
    from packmask.backends.varlen import tree_varlen_attention
    from packmask.layout import TreeLayout
    fake_varlen_kernel(_reference_varlen_attn)
    torch.manual_seed(0)
    layout = TreeLayout.from_parents(torch.tensor([[-1, 0, 1, 2, 3, 1, 5], [-1, 0, 0, 2, -1, 4, 5]]))
    q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    spec = AttentionSpec(scale=0.3, sliding_window=window)
    assert rel_err(tree_varlen_attention(q, k, v, layout, spec), eager.run(q, k, v, layout, spec, False)) < 1e-5


def test_a_reused_mask_does_not_replay_an_earlier_block():
    """The remembered request serves only the recomputation of the same forward: the same mask tensor
    used later outside any block dispatches afresh."""
    model = tiny_model("llama", "packmask")
    ids = torch.randint(1, 128, (1, 8))
    mask = packmask.block_diagonal_mask([[3, 5]], 8)
    with packmask.backend("eager"):
        expected = model(input_ids=ids, attention_mask=mask).logits
    with packmask.backend("flex"), pytest.raises(PackmaskError, match="flex needs CUDA"):
        model(input_ids=ids, attention_mask=mask)
    assert rel_err(model(input_ids=ids, attention_mask=mask).logits, expected) < 1e-5  # auto: sdpa on CPU
