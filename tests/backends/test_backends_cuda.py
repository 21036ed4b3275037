"""CUDA backends (varlen, flex, and sdpa/eager on the GPU) against the ground truth.

For small-but-not-trivial models in bf16, each backend's packed logits and parameter gradients are
compared with the same weights in fp32 run on each sequence alone. The bf16 noise floor is measured
beside: the bf16 model run on each sequence alone with transformers' sdpa. A backend passes within
2x the floor (+1e-3); a control (documents seeing each other) must fail the same bound.
Skipped without a GPU (tests/conftest.py); replaces benchmarks/gpu_check.py.
"""
import pytest
import torch

import packmask
from packmask.testing import grad_rel_err, pack_rows, rel_err, run_alone, tiny_model

pytestmark = pytest.mark.cuda

SIZES = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=4096, vocab_size=512)
FAMILY_SIZES = {"mistral": dict(sliding_window=64), "qwen3": dict(head_dim=32),
                "gemma2": dict(sliding_window=64, head_dim=32, query_pre_attn_scalar=32)}
SEQ = [[300, 120, 500, 104], [1000, 24]]
N = 1024
# the backends each family's layers can run on (gemma2 softcaps: varlen and sdpa refuse)
BACKENDS = {"llama": ["auto", "varlen", "flex", "sdpa", "eager"], "mistral": ["auto", "varlen", "flex", "sdpa"],
            "qwen3": ["auto", "varlen", "sdpa"], "gemma2": ["auto", "eager"]}


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 512, (2, N), generator=g).cuda()
    slices, pos = pack_rows(SEQ, N)
    weights = torch.zeros(2, N, 512)
    for b, s, length in slices:
        weights[b, s:s + length] = torch.randn(length, 512, generator=g)
    layout = packmask.DocumentLayout.from_seq_lengths(SEQ, N, device="cuda")
    keys = dict(position_ids=pos.cuda(), cu_seq_lens_q=layout.cu_seqlens, cu_seq_lens_k=layout.cu_seqlens,
                max_length_q=layout.max_seqlen, max_length_k=layout.max_seqlen)
    return ids, slices, weights.cuda(), keys


def _reference(family, ids, slices, weights):
    kw = dict(SIZES, **FAMILY_SIZES.get(family, {}))
    ref32 = tiny_model(family, "eager", **kw).cuda()
    expected = run_alone(ref32, ids, slices)
    (expected * weights).sum().backward()
    noise = tiny_model(family, "sdpa", dtype=torch.bfloat16, **kw).cuda()
    noise.load_state_dict(ref32.state_dict())
    n_out = run_alone(noise, ids, slices).float()
    (n_out * weights).sum().backward()
    return kw, ref32, expected, rel_err(n_out, expected), grad_rel_err(noise, ref32)[0]


@pytest.mark.parametrize("family", list(BACKENDS))
def test_cuda_backends_equal_each_sequence_alone(family, batch):
    ids, slices, weights, keys = batch
    kw, ref32, expected, floor, gfloor = _reference(family, ids, slices, weights)
    used = (weights.abs().sum(-1, keepdim=True) > 0)
    for name in BACKENDS[family]:
        model = tiny_model(family, "packmask", dtype=torch.bfloat16, **kw).cuda()
        model.load_state_dict(ref32.state_dict())
        with packmask.backend(name):
            out = model(input_ids=ids, **keys).logits.float() * used
        (out * weights).sum().backward()
        logits_err, (grads_err, worst) = rel_err(out, expected), grad_rel_err(model, ref32)
        assert logits_err <= 2 * floor + 1e-3, (family, name, logits_err, floor)
        assert grads_err <= 2 * gfloor + 1e-3, (family, name, grads_err, gfloor, worst)
    # control: the same rows as plain causal attention (documents see each other) fail the bound
    plain = tiny_model(family, "sdpa", dtype=torch.bfloat16, **kw).cuda()
    plain.load_state_dict(ref32.state_dict())
    # no position_ids: with packed position_ids transformers' sdpa would itself isolate the documents
    contaminated = plain(input_ids=ids, use_cache=False).logits.float() * used
    assert rel_err(contaminated, expected) > 2 * floor + 1e-3


# the backends a general mask's layout runs on; the others must refuse it with a PackmaskError (flex
# refuses trees: inductor finds no kernel config for a tree BlockMask on torch 2.11; varlen refuses
# general, non-tree masks)
GENERAL_BACKENDS = {"prefix_lm": {"runs": ["auto", "flex", "sdpa"], "refuses": {"varlen": "block-diagonal, tree or pieces"}},
                    "tree": {"runs": ["auto", "varlen", "sdpa"], "refuses": {"flex": "tree BlockMasks"}}}


@pytest.mark.parametrize("form", ["prefix_lm", "tree"])
def test_cuda_general_masks_equal_dense_fp32(form):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 512, (2, N), generator=g).cuda()
    if form == "prefix_lm":
        mask = packmask.prefix_lm_mask(SEQ, [[100, 0, 200, 10], [500, 0]], N)
    else:
        mask = torch.stack([packmask.shared_prefix_tree_mask(200, [300, 400, 124])] * 2)
    mask = mask.cuda()
    pos = packmask.position_ids_from_mask(mask)
    ref32 = tiny_model("llama", "eager", **SIZES).cuda()
    additive = torch.where(mask, 0.0, torch.finfo(torch.float32).min)[:, None]
    expected = ref32(input_ids=ids, attention_mask=additive, position_ids=pos, use_cache=False).logits
    model = tiny_model("llama", "packmask", dtype=torch.bfloat16, **SIZES).cuda()
    model.load_state_dict(ref32.state_dict())
    for name in GENERAL_BACKENDS[form]["runs"]:
        with packmask.backend(name):
            out = model(input_ids=ids, attention_mask=mask).logits.float()
        assert rel_err(out, expected) < 2e-2, (form, name)
    for name, reason in GENERAL_BACKENDS[form]["refuses"].items():  # forced onto a layout it cannot run: refused
        with packmask.backend(name), pytest.raises(packmask.PackmaskError, match=f"backend '{name}'.*{reason}"):
            model(input_ids=ids, attention_mask=mask)
    causal = tiny_model("llama", "sdpa", dtype=torch.bfloat16, **SIZES).cuda()
    causal.load_state_dict(ref32.state_dict())
    assert rel_err(causal(input_ids=ids, position_ids=pos, use_cache=False).logits.float(), expected) > 2e-2
