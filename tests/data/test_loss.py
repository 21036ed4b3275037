"""One optimizer step on packed rows gives the same parameters as on the same sequences unpacked.

fp32 on CPU, tiny random Llama. The unpacked reference runs every sequence alone through the
model with transformers' own loss; the packed run goes pack_lengths -> PackedCollator -> one forward
-> packed_causal_lm_loss.
"""
import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from packmask.data.collator import PackedCollator
from packmask.data.loss import packed_causal_lm_loss, sequence_ids
from packmask.data.packing import pack_lengths

LENGTHS = [5, 9, 4, 11, 6, 3, 1, 7]
ROW = 16
TOL = 1e-5


def _model(attn_implementation):
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(
        config, attn_implementation=attn_implementation, dtype=torch.float32)


def _sequences():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, 128, (n,), generator=g).tolist() for n in LENGTHS]


def _packed_batch(seqs):
    assignment = pack_lengths([len(s) for s in seqs], ROW)
    features = []
    for r in range(assignment.num_rows):
        a, b = assignment.row_offsets[r], assignment.row_offsets[r + 1]
        docs = assignment.doc_index[a:b].tolist()
        features.append({"input_ids": [t for d in docs for t in seqs[d]], "seq_lengths": [len(seqs[d]) for d in docs]})
    assert len(features) > 1 and any(len(f["seq_lengths"]) > 1 for f in features)
    return PackedCollator(pad_to_multiple_of=8, return_mask=True)(features)


def _unpacked_loss(model, seqs, reduction):
    total = sum(len(s) - 1 for s in seqs)
    losses = []
    for s in seqs:
        ids = torch.tensor([s])
        if len(s) < 2:
            continue  # a one-token sequence predicts nothing
        if reduction == "token":  # transformers' loss: sum over tokens / num_items_in_batch
            losses.append(model(input_ids=ids, labels=ids, num_items_in_batch=total).loss)
        else:
            losses.append(model(input_ids=ids, labels=ids).loss)
    return torch.stack(losses).sum() if reduction == "token" else torch.stack(losses).mean()


def _packed_loss(model, batch, reduction, form):
    if form == "sdpa_position_ids":
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    elif form == "packmask_cu_seq_lens":
        keys = ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
        out = model(**{k: batch[k] for k in keys}, use_cache=False)
    else:  # packmask with the [B, N, N] mask
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], use_cache=False)
    return packed_causal_lm_loss(out.logits, batch["labels"], position_ids=batch["position_ids"], reduction=reduction)


FORMS = [("sdpa", "sdpa_position_ids")]
if importlib.util.find_spec("packmask.integration") is not None:
    FORMS += [("packmask", "packmask_cu_seq_lens"), ("packmask", "packmask_mask")]


@pytest.mark.parametrize("attn,form", FORMS)
@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_one_step_packed_equals_unpacked(attn, form, reduction, optimizer):
    if attn == "packmask":
        import packmask.integration  # noqa: F401  registers attn_implementation="packmask"
    seqs = _sequences()
    ref = _model("sdpa")
    packed = _model(attn)
    packed.load_state_dict(ref.state_dict())
    # Adam's first step is ~lr * g / (|g| + eps): for gradients near eps it amplifies fp32 rounding
    # (1e-10 on a 1e-9 gradient) into 1e-4 parameter differences whatever the packing, so eps=1e-6.
    make = ((lambda p: torch.optim.SGD(p, lr=0.5)) if optimizer == "sgd"
            else (lambda p: torch.optim.AdamW(p, lr=1e-2, eps=1e-6)))
    opt_ref, opt_packed = make(ref.parameters()), make(packed.parameters())

    loss_ref = _unpacked_loss(ref, seqs, reduction)
    loss_packed = _packed_loss(packed, _packed_batch(seqs), reduction, form)
    assert torch.allclose(loss_packed, loss_ref, rtol=1e-6, atol=1e-6), (loss_packed.item(), loss_ref.item())
    loss_ref.backward()
    loss_packed.backward()
    opt_ref.step()
    opt_packed.step()

    worst, moved = 0.0, 0.0
    initial = _model("sdpa").state_dict()
    for (name, p_ref), p_packed in zip(ref.named_parameters(), packed.parameters()):
        worst = max(worst, (p_ref - p_packed).abs().max().item())
        moved = max(moved, (p_ref - initial[name]).abs().max().item())
    assert moved > 1e-3, "the step did not move the parameters; the comparison would prove nothing"
    assert worst <= TOL, f"parameters differ by {worst:.2e} after one {optimizer} step ({reduction})"


def test_token_reduction_equals_transformers_loss_on_the_packed_batch():
    seqs = _sequences()
    model = _model("sdpa")
    batch = _packed_batch(seqs)
    total = int((batch["labels"][:, 1:] != -100).sum())
    hf = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
               num_items_in_batch=total, use_cache=False)
    ours = packed_causal_lm_loss(hf.logits, batch["labels"], cu_seq_lens=batch["cu_seq_lens_q"], num_items_in_batch=total)
    assert torch.allclose(ours, hf.loss, rtol=1e-6)


def test_sequence_mean_weighs_sequences_equally_and_ignores_cross_boundary_targets():
    # row: a (3 tokens) b (2 tokens); logits make every prediction cost log(V) except a0->a1 which is free
    V = 4
    labels = torch.tensor([[1, 2, 3, 0, 1]])  # no -100 at b's start: the loss must still not score a2 -> b0
    position_ids = torch.tensor([[0, 1, 2, 0, 1]])
    logits = torch.zeros(1, 5, V)
    logits[0, 0, 2] = 1e4  # a0 -> a1 (label 2) costs 0
    log_v = torch.log(torch.tensor(float(V)))
    tok = packed_causal_lm_loss(logits, labels, position_ids=position_ids)
    seq = packed_causal_lm_loss(logits, labels, position_ids=position_ids, reduction="sequence")
    assert torch.allclose(tok, 2 * log_v / 3)  # predictions a0->a1, a1->a2, b0->b1
    assert torch.allclose(seq, (log_v / 2 + log_v) / 2)
    ids = sequence_ids(position_ids=position_ids, shape=(1, 5))
    assert ids.tolist() == [[0, 0, 0, 1, 1]]
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    assert torch.equal(sequence_ids(cu_seq_lens=cu, shape=(1, 5)), ids)


def test_bad_arguments():
    logits, labels = torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction"):
        packed_causal_lm_loss(logits, labels, reduction="mean")
    with pytest.raises(ValueError, match="cu_seq_lens"):
        packed_causal_lm_loss(logits, labels, cu_seq_lens=torch.tensor([0, 2]))
