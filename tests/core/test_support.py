"""Guards: models packmask cannot isolate refuse packed input clearly; transformers' pitfalls are correct.

Pitfall decisions (each covered below):

* packed ``position_ids`` with ``use_cache`` at its default — isolated (correct result).
* all-ones 2D ``attention_mask`` plus packed ``position_ids`` — isolated (correct result).
* ``position_ids`` that do not start at 0 — packmask never rewrites positions you pass; documents
  start wherever the positions jump. RoPE models give the same result as starting at 0 (RoPE is
  relative); absolute-position models (gpt2) give exactly what that sequence gives alone with the
  same positions — the caller asked for those positions.
* a 4D bool mask under ``eager`` — transformers *adds* it to the scores (1/0 instead of blocking):
  with packmask imported, it is converted to the additive form first, so the result is correct.
"""
import pytest
import torch

import packmask
from packmask.support import check_packed_input, is_packed_input, unsupported_reason
from packmask.testing import pack_rows, rel_err, run_alone, tiny_model

SEQ_LENGTHS = [[5, 9, 4], [11, 6]]
N = 18
TOL = 1e-5


def _packed(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (2, N), generator=g)
    slices, pos = pack_rows(SEQ_LENGTHS, N)
    real = torch.zeros(2, N, 1)
    for b, s, length in slices:
        real[b, s:s + length] = 1
    return ids, slices, pos, real


@pytest.mark.parametrize("family", ["mamba", "jamba"])
def test_recurrent_family_refuses_packed_input_and_runs_unpacked(family):
    model = tiny_model(family)
    assert "state-space / recurrent" in unsupported_reason(model)
    ids, slices, pos, _ = _packed()
    for kwargs in (dict(attention_mask=packmask.block_diagonal_mask(SEQ_LENGTHS, N)), dict(position_ids=pos),
                   dict(seq_lengths=SEQ_LENGTHS)):
        with pytest.raises(packmask.UnsupportedModelError, match="cannot pack this model.*unpacked"):
            model(input_ids=ids, use_cache=False, **kwargs)
    # an ordinary batch (one sequence per row, 2D padding mask) is not refused and matches eager
    ref = tiny_model(family, "eager")
    ref.load_state_dict(model.state_dict())
    am = torch.ones(2, N, dtype=torch.long)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=am, use_cache=False).logits
        b = ref(input_ids=ids, attention_mask=am, use_cache=False).logits
    assert rel_err(a, b) <= TOL


def test_model_with_its_own_attention_code_refuses_with_the_fix():
    model = tiny_model("bloom")  # ALiBi in bloom's own attention code, outside AttentionInterface
    ids, *_ = _packed()
    with pytest.raises(packmask.UnsupportedModelError, match="ALiBi.*attn_implementation='eager'"):
        model(input_ids=ids)
    report = packmask.verify(model, print_table=False)
    assert report.refused and not report.passed


def test_enable_refuses_a_model_that_cannot_switch():
    import _by_name_model  # picks its attention class by name at construction, in every transformers release

    model = _by_name_model.build("eager")
    with pytest.raises(packmask.UnsupportedModelError, match="stayed on attn_implementation='eager'"):
        packmask.enable(model)
    assert model.config._attn_implementation == "eager"
    assert packmask.enable(tiny_model("llama", "eager")).config._attn_implementation == "packmask"  # control


def test_supported_models_are_not_flagged():
    for family in ("llama", "gpt2", "qwen2"):
        assert unsupported_reason(tiny_model(family)) is None


def test_is_packed_input():
    mask = packmask.block_diagonal_mask(SEQ_LENGTHS, N)
    assert is_packed_input(mask=mask) and is_packed_input(mask=mask[:, None])
    assert not is_packed_input(mask=torch.ones(2, N, N, dtype=torch.bool).tril())
    assert not is_packed_input(mask=torch.ones(2, N, dtype=torch.long))
    _, _, pos, _ = _packed()
    assert is_packed_input(position_ids=pos)
    assert not is_packed_input(position_ids=torch.arange(N)[None].expand(2, N))
    assert is_packed_input(seq_lengths=[[3, 4]]) and not is_packed_input(seq_lengths=[[7], [5]])
    model = tiny_model("llama")
    check_packed_input(model, mask=mask)  # supported: no error


@pytest.mark.parametrize("form", ["position_ids", "position_ids_ones_2d"])
def test_pitfall_packed_position_ids_are_isolated(form):
    """use_cache left at its default, with or without an all-ones 2D mask: still isolated."""
    report = packmask.verify(tiny_model("llama"), forms=(form,), print_table=False)
    assert report.passed, report.summary()


def test_pitfall_position_ids_not_starting_at_zero_rope_is_relative():
    model = tiny_model("llama")
    ids, slices, pos, real = _packed()
    out = model(input_ids=ids, position_ids=pos + 7, use_cache=False).logits
    expected = run_alone(model, ids, slices)  # each alone from position 0
    assert rel_err(out * real, expected) <= TOL


def test_pitfall_position_ids_not_starting_at_zero_absolute_positions_are_honoured():
    model = tiny_model("gpt2")
    ids, slices, pos, real = _packed()
    out = model(input_ids=ids, position_ids=pos + 7, use_cache=False).logits
    for b, s, length in slices:  # each document equals itself alone with the same positions...
        alone = model(input_ids=ids[b:b + 1, s:s + length], position_ids=torch.arange(length)[None] + 7,
                      use_cache=False).logits
        assert rel_err(out[b:b + 1, s:s + length], alone) <= TOL
    from_zero = run_alone(model, ids, slices)  # ...and not the from-0 result: positions are not rewritten
    assert rel_err(out * real, from_zero) > 1e-3


@pytest.mark.parametrize("dtype", [torch.bool, torch.long])
def test_pitfall_4d_bool_mask_under_eager_is_correct(dtype):
    model = tiny_model("llama", "eager")
    ids, slices, pos, real = _packed()
    mask = packmask.block_diagonal_mask(SEQ_LENGTHS, N)[:, None].to(dtype)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    assert rel_err(out * real, run_alone(model, ids, slices)) <= TOL


def test_attention_sinks_are_honoured_packed_and_unpacked():
    model = tiny_model("gpt_oss")  # per-head sink logits join every softmax
    assert packmask.verify(model, print_table=False).passed
    ref = tiny_model("gpt_oss", "eager")
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(3, 100, (2, 10))
    am = torch.ones(2, 10, dtype=torch.long)
    am[1, 7:] = 0
    with torch.no_grad():
        a, b = model(input_ids=ids, attention_mask=am).logits, ref(input_ids=ids, attention_mask=am).logits
    assert rel_err(a[am.bool()], b[am.bool()]) <= TOL


def test_packed_queries_against_extra_keys_are_refused():
    """dory's later loops attend to keys of an earlier pass: with packed collator keys packmask cannot
    assign those keys to sequences, so it refuses instead of attending across sequences."""
    report = packmask.verify(tiny_model("dory"), forms=("collator",), print_table=False)
    (row,) = report.rows
    assert row.error_type == "UnsupportedModelError" and "keys" in row.error


def test_packed_multimodal_rope_positions_without_a_mask_are_refused():
    """[3, B, N] (temporal, height, width) positions cannot mark sequence starts (image tokens share
    positions): without a mask or cu_seq_lens packmask refuses instead of attending across sequences."""
    from packmask.integration import packmask_attention

    module = torch.nn.Module()
    module.is_causal = True
    q = k = v = torch.randn(1, 2, 6, 8)
    pos = torch.tensor([0, 1, 2, 0, 1, 2]).expand(3, 1, 6)
    with pytest.raises(packmask.UnsupportedModelError, match="multimodal RoPE"):
        packmask_attention(module, q, k, v, None, position_ids=pos)
    # one sequence per row: nothing packed, the ordinary path
    out, _ = packmask_attention(module, q, k, v, None, position_ids=torch.arange(6).expand(3, 1, 6))
    assert out.shape == (1, 6, 2, 8)


def test_an_additive_causal_4d_mask_is_not_packed():
    """transformers' additive convention (0 = attend, dtype-min = blocked): an ordinary causal mask is
    not packed input (it used to be read as 0 = blocked, so recurrent models refused an unpacked batch);
    an additive block-diagonal mask is."""
    causal = torch.ones(1, 1, N, N, dtype=torch.bool).tril()
    additive = torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert not is_packed_input(mask=additive)
    packed = packmask.block_diagonal_mask(SEQ_LENGTHS, N)[:, None]
    assert is_packed_input(mask=torch.zeros(packed.shape).masked_fill(~packed, float("-inf")))
    check_packed_input(tiny_model("mamba"), mask=additive)  # an ordinary batch: not refused
