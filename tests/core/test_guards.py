"""Help at the point of the mistake (issue 10 item 7): packed inputs given to a model *not* on packmask
raise or warn naming the fix -- only where transformers would crash or silently mix sequences; the
masks transformers handles itself keep working. Also the eager guard's switch and its one log line, and
the construction-time refusal of families that pick attention classes by name (falcon's raw KeyError)."""
import logging
import sys
import warnings

import pytest
import torch

import packmask
from packmask import PackmaskError, PackmaskWarning, UnsupportedModelError, guards
from packmask.testing import families_choosing_attention_by_name, pack_rows, rel_err, run_alone, tiny_model

SEQ_LENGTHS = [[5, 9, 4], [11, 6]]
N = 18
TOL = 1e-5


@pytest.fixture(autouse=True)
def fresh_guards():
    """Each test sees the checks as a new process does: nothing warned or logged yet, defaults on."""
    saved = guards.configure()
    guards._ONCE.clear()
    yield
    guards.configure(**saved)
    guards._ONCE.clear()


def _packed():
    ids = torch.randint(3, 100, (2, N), generator=torch.Generator().manual_seed(0))
    slices, pos = pack_rows(SEQ_LENGTHS, N)
    real = torch.zeros(2, N, 1)
    for b, s, length in slices:
        real[b, s:s + length] = 1
    return ids, slices, pos, real


@pytest.mark.parametrize("family, impl", [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa")])
def test_bnn_mask_on_a_stock_model_names_packmask(family, impl):
    model = tiny_model(family, impl)
    ids, slices, pos, real = _packed()
    mask = packmask.block_diagonal_mask(SEQ_LENGTHS, N)
    with pytest.raises(PackmaskError, match='attn_implementation="packmask"'):
        model(input_ids=ids, attention_mask=mask, position_ids=pos)
    # the defect, with the check off: llama crashes deep in transformers, gpt2 silently mixes sequences
    packmask.configure(stock_model_checks=False)
    if family == "llama":
        with pytest.raises(RuntimeError, match="expand"):
            model(input_ids=ids, attention_mask=mask, position_ids=pos)
    else:
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        assert rel_err(out * real, run_alone(model, ids, slices)) > 1e-2


def test_transformers_own_4d_masks_keep_working():
    model = tiny_model("llama", "sdpa")
    ids, slices, pos, real = _packed()
    expected = run_alone(model, ids, slices)
    bool_mask = packmask.block_diagonal_mask(SEQ_LENGTHS, N)[:, None]
    additive = torch.zeros(bool_mask.shape).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PackmaskWarning)  # no warning either
        for mask in (bool_mask, additive):
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
            assert rel_err(out * real, expected) <= TOL
        # a 4D mask against a cache (one new query, 6 keys), as in generation
        cached = model(input_ids=ids[:1, :5], use_cache=True)
        step_mask = torch.ones(1, 1, 1, 6, dtype=torch.bool)
        step = model(input_ids=ids[:1, 5:6], attention_mask=step_mask, cache=cached.cache,
                     position_ids=torch.tensor([[5]])).logits
        assert rel_err(step[0, -1], model(input_ids=ids[:1, :6]).logits[0, -1]) <= TOL


def test_integer_4d_mask_on_sdpa_is_a_clear_error():
    model = tiny_model("llama", "sdpa")
    ids, _, pos, _ = _packed()
    mask = packmask.block_diagonal_mask(SEQ_LENGTHS, N)[:, None].long()
    with pytest.raises(PackmaskError, match="mask.bool()"):
        model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("extra, mixes", [
    ({}, True),                                                 # use_cache at its default (on)
    ({"attention_mask": torch.ones(2, N, dtype=torch.long), "use_cache": False}, True),  # all-ones 2D mask
    ({"use_cache": False}, False),                              # transformers' own packed path: correct
])
def test_packed_positions_warn_once_exactly_when_sequences_mix(impl, extra, mixes):
    model = tiny_model("llama", impl)
    ids, slices, pos, real = _packed()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(input_ids=ids, position_ids=pos, **extra).logits
        model(input_ids=ids, position_ids=pos, **extra)  # a second call: no second warning
    ours = [w for w in caught if issubclass(w.category, PackmaskWarning)]
    error = rel_err(out * real, run_alone(model, ids, slices))
    if mixes:
        assert error > 1e-2 and len(ours) == 1 and 'attn_implementation="packmask"' in str(ours[0].message)
    else:
        assert error <= TOL and not ours


def test_left_padded_generation_positions_do_not_warn():
    model = tiny_model("llama", "sdpa")
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # what generate() builds: [1, 1, 0, 1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error", PackmaskWarning)
        model(input_ids=torch.randint(3, 100, (2, 5)), attention_mask=mask, position_ids=pos)


def test_eager_guard_logs_once_and_can_be_switched_off(caplog):
    model = tiny_model("llama", "eager")
    ids, slices, pos, real = _packed()
    expected = run_alone(model, ids, slices)
    mask = packmask.block_diagonal_mask(SEQ_LENGTHS, N)[:, None]
    with caplog.at_level(logging.INFO, logger="packmask"):
        for _ in range(2):
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
            assert rel_err(out * real, expected) <= TOL
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "eager_mask_guard=False" in caplog.records[0].getMessage()
    packmask.configure(eager_mask_guard=False)  # transformers' own behaviour: the bool mask is added, not applied
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    assert rel_err(out * real, expected) > 1e-2
    with pytest.raises(PackmaskError, match="True or False"):
        packmask.configure(eager_mask_guard="off")


# which families pick attention classes by name changes between releases (falcon moved to the
# interface in transformers 5.25): take them from the installed transformers, plus a toy of our own
BY_NAME = [f for f in families_choosing_attention_by_name() if f in ("gpt_neo", "falcon")] or \
    families_choosing_attention_by_name()[:1]


@pytest.mark.parametrize("family", BY_NAME)
def test_family_choosing_attention_classes_by_name_is_refused_when_built(family):
    with pytest.raises(UnsupportedModelError, match="ATTENTION_CLASSES.*attn_implementation='sdpa'"):
        tiny_model(family)
    assert tiny_model(family, "eager").config._attn_implementation == "eager"  # the fix works


def test_model_choosing_attention_classes_by_name_is_refused_when_built():
    """The same refusal on a toy model of our own, which bypasses the interface in every release."""
    import _by_name_model

    with pytest.raises(UnsupportedModelError, match="TOY_ATTENTION_CLASSES.*attn_implementation='sdpa'"):
        _by_name_model.build("packmask")
    assert _by_name_model.build("eager").config._attn_implementation == "eager"  # the fix works
    assert guards.attention_classes_by_name(_by_name_model)[0] == "TOY_ATTENTION_CLASSES"
    assert guards.attention_classes_by_name(sys.modules[type(tiny_model("llama")).__module__]) is None  # control


def test_model_using_the_mask_outside_attention_is_refused_not_crashed():
    """esm multiplies its embeddings by attention_mask (token dropout): a [B, N, N] mask turned the
    queries 5-D and packmask's attention failed with a raw unpacking ValueError."""
    from transformers import AutoModel

    from packmask.testing import tiny_config

    model = AutoModel.from_config(tiny_config("esm", pad_token_id=1, mask_token_id=2), attn_implementation="packmask")
    mask = packmask.block_diagonal_mask([[5, 7]], 12, causal_within=False)
    with pytest.raises(UnsupportedModelError, match="outside attention"):
        model(input_ids=torch.randint(4, 20, (1, 12)), attention_mask=mask)
    assert model(input_ids=torch.randint(4, 20, (1, 12))).last_hidden_state.shape == (1, 12, 64)  # unpacked runs
