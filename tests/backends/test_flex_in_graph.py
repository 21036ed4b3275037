"""flex attention's BlockMask when the layout is built *inside* ``torch.compile`` (what a compiled
model's layers do: the forward pre-hook hands them ``cu_seq_lens``, each layer builds its layout and
BlockMask in the graph).

``torch.compile(model)`` with the flex backend gave compiled logits 0.59 (relative error) away from
eager on an H200 (torch 2.11, issue 21) while eager flex was exact. The BlockMask's key-block
indices were then computed in the graph by a stable descending ``argsort`` of int8 tiles, which
inductor lowers on CUDA to a Triton sort network (on CPU it calls aten's sort). ``block_indices``
now needs no sort; these tests compare the in-graph BlockMask with the eager one (CPU here, CUDA in
the ``cuda``-marked case) and flex with an in-graph BlockMask with eager flex on a GPU.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from packmask.backends.flex import block_indices, document_block_mask, flex_attention_call
from packmask.backends.spec import AttentionSpec
from packmask.layout import DocumentLayout

SPLITS = ([[100, 300, 112], [512]], [[256, 256], [17, 400, 95]])
N = 512


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_block_indices_lists_set_blocks_first_in_order(b, q, k, seed):
    g = torch.Generator().manual_seed(seed)
    tiles = torch.rand(b, q, k, generator=g) < torch.rand(1, generator=g)
    counts, idx = block_indices(tiles)
    expected = torch.argsort(tiles.to(torch.int32), dim=-1, descending=True, stable=True)  # aten's sort, eager
    assert torch.equal(counts[:, 0], tiles.sum(-1, dtype=torch.int32))
    assert torch.equal(idx[:, 0].long(), expected)


def _block_mask_tensors(cu, device):
    """The BlockMask of the layout of ``cu`` as a tuple of tensors (what flex's kernels read)."""
    mask = document_block_mask(DocumentLayout(cu, N, 2, N, True), device)
    return (mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices,
            mask.q_num_blocks, mask.q_indices, mask.full_q_num_blocks, mask.full_q_indices)


def _valid(counts, indices):
    """Only the first ``counts`` indices of a row are read by flex; the rest are padding."""
    keep = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    return torch.where(keep, indices, -1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_block_mask_built_in_the_graph_equals_eager(device):
    torch._dynamo.reset()
    build = torch.compile(_block_mask_tensors, backend="inductor", dynamic=True)
    tensors = {}
    for split in SPLITS:
        cu = DocumentLayout.from_seq_lengths(split, N, device=device).cu_seqlens.to(torch.int32)
        eager = _block_mask_tensors(cu, device)
        compiled = build(cu, device)
        for i in range(0, 8, 2):
            assert torch.equal(compiled[i], eager[i]), (split, i)
            assert torch.equal(_valid(compiled[i], compiled[i + 1]), _valid(eager[i], eager[i + 1])), (split, i + 1)
        tensors[str(split)] = eager
    # control: the two splits have different BlockMasks, so the comparison above can fail
    a, b = tensors.values()
    assert not all(torch.equal(_valid(a[i], a[i + 1]), _valid(b[i], b[i + 1])) for i in (0, 2))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_with_a_block_mask_built_in_the_graph_equals_eager_flex_on_gpu():
    """Eager flex (BlockMask built on the host side) vs flex whose layout and BlockMask are built
    inside torch.compile from cu_seq_lens, as a compiled model's layers do; and the dense reference."""
    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 4, N, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(2, 2, N, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    spec = AttentionSpec(scale=0.125)

    def in_graph(q, k, v, cu):
        return flex_attention_call(q, k, v, DocumentLayout(cu, N, 2, N, True), spec)

    compiled = torch.compile(in_graph)
    for split in SPLITS:
        layout = DocumentLayout.from_seq_lengths(split, N, device="cuda")
        eager = flex_attention_call(q, k, v, layout, spec).float()
        dense = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1),
            attn_mask=layout.dense_mask(), scale=0.125).transpose(1, 2)
        assert ((eager - dense).norm() / dense.norm()).item() <= 2e-2
        try:
            out = compiled(q, k, v, layout.cu_seqlens.to(torch.int32)).float()
        except torch._inductor.exc.InductorError as error:
            # torch 2.11 on an H200 (2026-12-05): "LoweringException: convert FlexibleLayout to FixedLayout
            # first" -- a loud compile error, never a wrong result; it is why packmask refuses flex under
            # torch.compile (backends/flex.py, tests/core/test_compile.py). A torch that compiles it is held
            # to the comparison below.
            pytest.xfail(f"this torch cannot compile flex with an in-graph BlockMask: {str(error).splitlines()[0]}")
        assert ((out - eager).norm() / eager.norm()).item() <= 2e-2, split
        plain = torch.nn.functional.scaled_dot_product_attention(  # control: no document boundaries
            q.float(), k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1), is_causal=True,
            scale=0.125).transpose(1, 2)
        assert ((plain - dense).norm() / dense.norm()).item() > 5e-2
