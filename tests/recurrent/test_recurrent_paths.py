"""The per-sequence recurrent path: checkpointing replay, unpacked input untouched, refusals, enable()."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import packmask
from packmask.recurrent import context, find_mixers, install, installed, uninstall
from packmask.testing import pack_rows, rel_err, run_alone, tiny_model

SEQ_LENGTHS = [[5, 9, 4], [8, 6]]
N = 18


def _batch(seed=0):
    ids = torch.randint(3, 100, (2, N), generator=torch.Generator().manual_seed(seed))
    slices, pos = pack_rows(SEQ_LENGTHS, N)
    labels = torch.full_like(ids, -100)
    for b, s, n in slices:
        labels[b, s + 1:s + n] = ids[b, s + 1:s + n]
    return ids, labels, slices, pos


def _alone_grads(model, ids, labels, slices):
    model.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for b, s, n in slices:
        out = model(input_ids=ids[b:b + 1, s:s + n], labels=labels[b:b + 1, s:s + n], use_cache=False)
        total = total + out.loss * (n - 1)
        count += n - 1
    loss = total / count
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _packed_grads(model, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)
    out.loss.backward()
    return out.loss.detach(), {k.replace(".inner.", "."): p.grad.clone() for k, p in model.named_parameters()
                               if p.grad is not None}


def _worst(a, b):
    assert a.keys() == b.keys()
    return max(rel_err(a[k], b[k]) for k in a if b[k].norm() > 0)


@pytest.mark.parametrize("family,use_reentrant", [("qwen3_5_text", False), ("nemotron_h", True)])
def test_gradient_checkpointing_replays_the_layout(family, use_reentrant, monkeypatch):
    model = tiny_model(family).train()
    ids, labels, slices, pos = _batch()
    ref_loss, ref = _alone_grads(model, ids, labels, slices)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    mask = packmask.block_diagonal_mask(SEQ_LENGTHS, N)
    loss, got = _packed_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    assert rel_err(loss, ref_loss) <= 1e-5 and _worst(got, ref) <= 1e-5
    # control: no replay (no bound checkpoint function, nothing remembered): the recompute runs the mixer over
    # the whole row
    monkeypatch.setattr(context, "_REPLAY_SIZE", 0)
    monkeypatch.setattr(context, "bind_checkpointing", lambda modules: None)
    model = tiny_model(family).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    try:
        _, bad = _packed_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    except ValueError as error:  # qwen3.5 on CPU: transformers refuses cu_seq_lens without fla
        assert "flash-linear-attention" in str(error)
    except torch.utils.checkpoint.CheckpointError:  # torch sees the recompute differ (another tensor count)
        pass
    else:
        assert _worst(bad, ref) > 1e-3


def test_wrapped_mixer_equals_original_on_unpacked_input():
    model = tiny_model("nemotron_h")
    fresh = tiny_model("nemotron_h")  # same seed, same weights, never wrapped
    ids, *_ = _batch()
    padding = torch.ones(2, N, dtype=torch.long)
    padding[1, :3] = 0  # left padding in row 1
    install(model)
    assert installed(model) and not installed(fresh)
    with torch.no_grad():
        for kwargs in (dict(), dict(attention_mask=padding)):
            assert torch.equal(model(input_ids=ids, **kwargs).logits, fresh(input_ids=ids, **kwargs).logits)
        # a mixer called directly, outside any forward: its own forward
        (name, mixer), = find_mixers(model)[:1]
        original = dict(fresh.named_modules())[name]
        hidden = torch.randn(2, N, model.config.hidden_size)
        assert torch.equal(mixer(hidden), original(hidden))


def test_generate_with_a_cache_is_not_refused():
    model = tiny_model("qwen3_5_text")
    ids = torch.randint(3, 100, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left-padded prompt: positions restart on padding, still one sequence per row
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 9)


@pytest.mark.parametrize("case", ["prefix_lm", "bidirectional", "cache", "use_cache"])
def test_refused_layouts_and_caches(case):
    """(Shared-prefix trees are no longer refused: tests/recurrent/test_recurrent_trees.py.)"""
    model = tiny_model("qwen3_5_text")
    ids, *_ = _batch()
    kwargs = dict(input_ids=ids, use_cache=False)
    if case == "prefix_lm":
        kwargs["attention_mask"] = packmask.prefix_lm_mask([[5, 13]] * 2, [[2, 4]] * 2, N)
        match = "not separate documents|tree"
    elif case == "bidirectional":
        kwargs["attention_mask"] = packmask.block_diagonal_mask(SEQ_LENGTHS, N, causal_within=False)
        match = "bidirectional"
    elif case == "cache":
        from transformers import DynamicCache
        kwargs.update(seq_lengths=SEQ_LENGTHS, past_key_values=DynamicCache(config=model.config), use_cache=None)
        match = "cache"
    else:
        kwargs.update(seq_lengths=SEQ_LENGTHS, use_cache=True)
        match = "use_cache=True"
    with pytest.raises(packmask.UnsupportedModelError, match=match):
        model(**kwargs)


def test_enable_installs_and_uninstall_refuses_again():
    model = tiny_model("mamba", "eager")
    packmask.enable(model)
    assert installed(model) == ["backbone.layers.0.mixer", "backbone.layers.1.mixer"]
    ids, *_ = _batch()
    with torch.no_grad():
        model(input_ids=ids, seq_lengths=SEQ_LENGTHS)  # packed: accepted
        assert uninstall(model) == 2
        with pytest.raises(packmask.UnsupportedModelError, match="state-space"):
            model(input_ids=ids, seq_lengths=SEQ_LENGTHS)


def test_enable_an_attention_free_model_that_cannot_switch(monkeypatch):
    model = tiny_model("mamba", "eager")

    def refuse(*args, **kwargs):
        raise ValueError("no attention to switch")
    monkeypatch.setattr(model, "set_attn_implementation", refuse)
    packmask.enable(model)
    ids, _, slices, _ = _batch()
    with torch.no_grad():
        packed = model(input_ids=ids, attention_mask=packmask.block_diagonal_mask(SEQ_LENGTHS, N)).logits
        for b, s, n in slices:
            alone = model(input_ids=ids[b:b + 1, s:s + n]).logits[0]
            assert rel_err(packed[b, s:s + n], alone) <= 1e-5


class _CheckpointedCall(torch.nn.Module):
    """A layer checkpointed around its ``__call__`` (as FSDP's activation checkpointing does): its
    module hooks run again in the recompute."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return torch.utils.checkpoint.checkpoint(self.inner, *args, use_reentrant=False, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def test_checkpoint_around_module_call_replays_the_layout(monkeypatch):
    model = tiny_model("nemotron_h").train()
    ids, labels, slices, _ = _batch()
    ref_loss, ref = _alone_grads(model, ids, labels, slices)
    layers = model.model.layers
    for i in range(len(layers)):
        layers[i] = _CheckpointedCall(layers[i])
    kwargs = dict(input_ids=ids, attention_mask=packmask.block_diagonal_mask(SEQ_LENGTHS, N), labels=labels)
    loss, got = _packed_grads(model, **kwargs)
    assert rel_err(loss, ref_loss) <= 1e-5 and _worst(got, ref) <= 1e-5
    monkeypatch.setattr(context, "_REPLAY_SIZE", 0)  # control: nothing remembered, the recompute is unpacked
    try:
        _, bad = _packed_grads(model, **kwargs)
    except torch.utils.checkpoint.CheckpointError:  # torch sees the recompute differ (another tensor count)
        pass
    else:
        assert _worst(bad, ref) > 1e-3


@pytest.mark.parametrize("family,batched", [("qwen3_5_text", True), ("qwen3_5_text", False), ("mamba2", True),
                                            ("rwkv", False)])
def test_grouped_and_one_call_per_sequence(family, batched):
    """Both ways of running the mixers are exact on documents of mixed lengths (longer than the chunks)."""
    from packmask.recurrent import configure
    previous = configure(batched=batched)
    try:
        report = packmask.verify(tiny_model(family), seq_lengths=[[20, 3, 9], [14, 13, 4]], forms=("seq_lengths",),
                                 print_table=False)
    finally:
        configure(**previous)
    assert report.passed, report.summary()


_MAMBA2 = {}


@settings(max_examples=6, deadline=None)
@given(st.lists(st.lists(st.integers(1, 12), min_size=1, max_size=4), min_size=1, max_size=3))
def test_random_layouts_equal_each_sequence_alone(rows):
    """Any split into sequences (length-1 ones included) gives each sequence's own logits (Mamba2: chunked scan)."""
    if "model" not in _MAMBA2:
        _MAMBA2["model"] = tiny_model("mamba2")
    model = _MAMBA2["model"]
    n = max(sum(r) for r in rows)
    slices, _ = pack_rows(rows, n)
    ids = torch.randint(3, 100, (len(rows), n), generator=torch.Generator().manual_seed(len(slices)))
    with torch.no_grad():
        alone = run_alone(model, ids, slices)
        packed = model(input_ids=ids, seq_lengths=rows).logits
    for b, s, length in slices:
        assert rel_err(packed[b, s:s + length], alone[b, s:s + length]) <= 1e-5
