"""Draft-tree verification on sdpa (packmask.backends.decode): the caller's own mask, one route per forward.

Every comparison against transformers' own sdpa with the same dense tree mask (what a user would
write) and against packmask's eager backend (exact math over the layout's mask), fp32 CPU,
relative error <= 1e-5, with a control (another tree's mask) that differs by > 1e-2.
"""
from __future__ import annotations

import inspect

import pytest
import torch
from transformers import LlamaForCausalLM

import packmask
from packmask import integration
from packmask.backends import decode
from packmask.host_syncs import count_host_syncs
from packmask.layout import analyse_mask
from packmask.masks import tree_mask
from packmask.testing import rel_err, tiny_config

TOL = 1e-5
PAST, VOCAB = 12, 100
PARENTS = [[-1, -1, 0, 0, 1, 2, 2, 4], [-1, 0, 1, 1, -1, 4, 3, 6]]
CHAIN = [[-1, 0, 1, 2, 3, 4, 5, 6]] * 2  # control: another tree, same shapes
CACHE = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def _model(layers=2):
    torch.manual_seed(0)
    cfg = tiny_config("llama", num_hidden_layers=layers)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def _setup(model):
    torch.manual_seed(1)
    prefix = torch.randint(1, VOCAB, (2, PAST))
    with torch.no_grad():
        cache = model(input_ids=prefix, use_cache=True).past_key_values
    ids = torch.randint(1, VOCAB, (2, len(PARENTS[0])))
    return cache, ids


def _verify(model, impl, cache, ids, mask4, pos, backend="auto"):
    """One verification forward; the cache is cropped back after it."""
    model.set_attn_implementation(impl)
    past = mask4.shape[-1] - ids.shape[1]
    try:
        with packmask.backend(backend):
            return model(input_ids=ids, attention_mask=mask4, position_ids=pos, use_cache=True,
                         **{CACHE: cache}).logits
    finally:
        for layer in cache.layers:
            if layer.get_seq_length() > past:
                layer.crop(past - layer.get_seq_length())


@torch.no_grad()
def test_decode_equals_dense_sdpa_and_eager():
    model = _model()
    cache, ids = _setup(model)
    mask, pos = tree_mask(torch.tensor(PARENTS), PAST)
    mine = _verify(model, "packmask", cache, ids, mask[:, None], pos)
    dense = _verify(model, "sdpa", cache, ids, mask[:, None], pos)
    eager = _verify(model, "packmask", cache, ids, mask[:, None], pos, backend="eager")
    assert rel_err(mine, dense) <= TOL and rel_err(mine, eager) <= TOL
    other, other_pos = tree_mask(torch.tensor(CHAIN), PAST)
    control = _verify(model, "sdpa", cache, ids, other[:, None], other_pos)
    assert rel_err(control, dense) > 1e-2


@torch.no_grad()
def test_layers_after_the_first_reuse_its_route(monkeypatch):
    model = _model(layers=4)
    cache, ids = _setup(model)
    mask, pos = tree_mask(torch.tensor(PARENTS), PAST)
    resolved = []
    real = integration.layer_layout
    monkeypatch.setattr(integration, "layer_layout", lambda *a, **kw: resolved.append(1) or real(*a, **kw))
    m4 = mask.clone()[:, None]
    out = _verify(model, "packmask", cache, ids, m4, pos)
    assert len(resolved) == 1  # the first layer resolves and dispatches; layers 2..4 take its route
    assert len(m4.__dict__["_packmask_decode_routes"]) == 1
    with torch.enable_grad():  # control: with gradients no route is remembered, every layer resolves
        again = _verify(model, "packmask", cache, ids, mask.clone()[:, None], pos)
    assert len(resolved) == 1 + 4
    assert rel_err(again, out) <= TOL


@torch.no_grad()
def test_in_place_edit_of_the_mask_takes_a_new_route():
    model = _model()
    cache, ids = _setup(model)
    mask, pos = tree_mask(torch.tensor(PARENTS), PAST)
    chain, chain_pos = tree_mask(torch.tensor(CHAIN), PAST)
    m4 = mask.clone()[:, None]
    first = _verify(model, "packmask", cache, ids, m4, pos)
    m4.copy_(chain[:, None])  # the same tensor, now another tree
    edited = _verify(model, "packmask", cache, ids, m4, chain_pos)
    ref = _verify(model, "sdpa", cache, ids, chain[:, None], chain_pos)
    assert rel_err(edited, ref) <= TOL
    assert rel_err(first, ref) > 1e-2  # control: the first tree's logits are far from the edited one's


@torch.no_grad()
def test_one_host_sync_per_forward_whatever_the_depth():
    """The mask analysis reads its checks back once; no layer syncs (the same count at 2 and 4 layers)."""
    counts = {}
    for layers in (2, 4):
        model = _model(layers)
        cache, ids = _setup(model)
        mask, pos = tree_mask(torch.tensor(PARENTS), PAST)
        _verify(model, "sdpa", cache, ids, mask[:, None], pos)  # warm
        with count_host_syncs() as plain:
            _verify(model, "sdpa", cache, ids, mask.clone()[:, None], pos)
        with count_host_syncs() as mine:
            _verify(model, "packmask", cache, ids, mask.clone()[:, None], pos)
        counts[layers] = sum(mine.values()) - sum(plain.values())
    assert counts[2] == counts[4] <= 1, counts


def test_callers_mask_is_used_unless_a_window_or_other_keys_need_another():
    mask, _ = tree_mask(torch.tensor(PARENTS), PAST)
    m4 = mask[:, None]
    layout = analyse_mask(m4)
    K = PAST + len(PARENTS[0])
    assert decode.decode_mask(layout, m4, K, None) is m4
    windowed = decode.decode_mask(layout, m4, K, 3)
    assert windowed is not m4 and torch.equal(windowed, layout.dense_mask(3, kv_len=K))
    assert not torch.equal(windowed, m4)  # control: the window hides keys the caller's mask shows
    cropped = decode.decode_mask(layout, m4, K - 4, None)  # a sliding cache layer keeps fewer keys
    assert cropped.shape[-1] == K - 4 and torch.equal(cropped, layout.dense_mask(kv_len=K - 4))
    assert decode.decode_mask(layout, m4.float(), K, None).dtype == torch.bool


def test_kv_heads_read_in_place_on_cpu():
    q, k = torch.zeros(1, 4, 8, 16), torch.zeros(1, 2, 20, 16)
    mask = torch.ones(1, 1, 8, 20, dtype=torch.bool)
    assert decode.gqa_in_place(q, k, k, mask)  # torch's CPU sdpa takes GQA with a mask
    assert not decode.gqa_in_place(q, q, q, mask[..., :8])  # control: no shared heads, nothing to decide


@pytest.mark.cuda
@torch.no_grad()
def test_decode_on_gpu_runs_a_fused_kernel_and_matches_sdpa():
    """bf16 on a GPU: packmask's decode forward equals transformers' sdpa with the same mask, and runs with
    only the fused kernels allowed (no fall back to sdpa's math kernel)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = _model().to("cuda", torch.bfloat16)
    model.set_attn_implementation("sdpa")
    past = 200
    torch.manual_seed(1)
    cache = model(input_ids=torch.randint(1, VOCAB, (2, past), device="cuda"), use_cache=True).past_key_values
    ids = torch.randint(1, VOCAB, (2, len(PARENTS[0])), device="cuda")
    mask, pos = tree_mask(torch.tensor(PARENTS, device="cuda"), past)
    dense = _verify(model, "sdpa", cache, ids, mask[:, None], pos)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        mine = _verify(model, "packmask", cache, ids, mask.clone()[:, None], pos)
    assert rel_err(mine.float(), dense.float()) <= 2e-2
    chain, chain_pos = tree_mask(torch.tensor(CHAIN, device="cuda"), past)
    assert rel_err(_verify(model, "sdpa", cache, ids, chain[:, None], chain_pos).float(), dense.float()) > 1e-2


@pytest.mark.cuda
@torch.no_grad()
def test_fused_gqa_answer_holds_on_gpu():
    """Where gqa_in_place says yes on a GPU, sdpa with enable_gqa and a bool mask runs with the memory-efficient
    kernel alone and equals the repeat_kv call; where it says no, that kernel refuses the call."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    q = torch.randn(2, 32, 64, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 4, 1088, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mask, _ = tree_mask(torch.tensor(PARENTS * 8, device="cuda").reshape(2, 64), 1024)
    mask = mask[:, None]
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(8, 1), v.repeat_interleave(8, 1), attn_mask=mask)
    native = decode.gqa_in_place(q, k, v, mask)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        if native:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            assert rel_err(out.float(), ref.float()) <= 2e-2
        else:
            with pytest.raises(RuntimeError):
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
