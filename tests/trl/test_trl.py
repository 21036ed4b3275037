"""PackedDPOTrainer / PackedGRPOTrainer against TRL's own trainers (CPU, fp32, tiny random Llama)."""
from __future__ import annotations


import pytest
import torch

pytest.importorskip("trl")

import packmask  # noqa: E402,F401  (registers the "packmask" attention)
from packmask.errors import PackmaskError  # noqa: E402
from packmask.testing import rel_err, tiny_model  # noqa: E402

from _trl_data import VOCAB, preference_data, text, tiny_tokenizer  # noqa: E402,F401  (tests/_trl_data.py)


# SGD, not Adam: Adam's update m / sqrt(v) is scale-free, so a weight whose gradient is ~0 (rounding noise)
# still moves by ~lr in a noise-chosen direction; SGD's update is linear in the gradient, so equal final
# weights certify equal gradients.
def run_dpo(trainer_cls, loss_type, tmp_path, precompute=False, truncation_mode="keep_start", steps=3):
    from datasets import Dataset
    from trl import DPOConfig

    model = tiny_model("llama", attn_implementation="packmask" if trainer_cls.__name__.startswith("Packed") else "eager")
    ref = None if precompute else tiny_model("llama", attn_implementation=model.config._attn_implementation)
    args = DPOConfig(output_dir=str(tmp_path / trainer_cls.__name__), per_device_train_batch_size=4, max_steps=steps,
                     learning_rate=0.1, optim="sgd", logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", bf16=False,
                     gradient_checkpointing=False, loss_type=[loss_type], beta=0.5, seed=0, max_length=14,
                     truncation_mode=truncation_mode, precompute_ref_log_probs=precompute, dataloader_num_workers=0,
                     disable_tqdm=True)
    trainer = trainer_cls(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(preference_data()),
                          processing_class=tiny_tokenizer())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return trainer, logs


def _compare(packed, padded):
    (pt, plogs), (tt, tlogs) = packed, padded
    assert len(plogs) == len(tlogs) == 3
    for a, b in zip(plogs, tlogs):
        # rewards are beta * (logp - ref logp): a difference of sums of magnitude |logps|, so their error
        # is relative to that scale, not to the (small) difference
        scale = 0.5 * max(abs(b["logps/chosen"]), abs(b["logps/rejected"]))
        for key in ("loss", "rewards/accuracies", "logps/chosen", "logps/rejected", "mean_token_accuracy", "entropy",
                    "num_tokens"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a[key], b[key])
        for key in ("logits/chosen", "logits/rejected"):   # a mean over the vocabulary of O(1) logits
            assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a[key], b[key])
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert a[key] == pytest.approx(b[key], abs=1e-5 * scale), (key, a[key], b[key])
    pp = dict(pt.model.named_parameters())
    worst = max(rel_err(pp[n].detach(), p.detach()) for n, p in tt.model.named_parameters())
    assert worst < 1e-5, worst
    moved = max(rel_err(p.detach(), q.detach()) for p, q in zip(pt.model.parameters(),
                                                               tiny_model("llama").parameters()))
    assert moved > 1e-3  # training changed the weights, so equal parameters mean equal gradients


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_packed_dpo_equals_trl(loss_type, tmp_path):
    from trl import DPOTrainer

    from packmask.trl import PackedDPOTrainer

    _compare(run_dpo(PackedDPOTrainer, loss_type, tmp_path), run_dpo(DPOTrainer, loss_type, tmp_path))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_packed_dpo_precomputed_reference_equals_trl(loss_type, tmp_path):
    from trl import DPOTrainer

    from packmask.trl import PackedDPOTrainer

    calls = []

    class Spy(PackedDPOTrainer):
        def compute_ref_log_probs(self, model, inputs):
            calls.append(inputs["attention_mask"].dim())   # the precompute ran on packed tree rows
            return super().compute_ref_log_probs(model, inputs)

    Spy.__name__ = "PackedSpy"
    _compare(run_dpo(Spy, loss_type, tmp_path, precompute=True), run_dpo(DPOTrainer, loss_type, tmp_path, precompute=True))
    assert calls and set(calls) == {3}


def test_packed_dpo_keep_end_and_other_losses_one_step(tmp_path):
    """keep_end truncation (chosen and rejected may keep different prompts: two sequences) and ``sft``
    (a mean over the chosen tokens of the batch rather than per-example sums)."""
    from trl import DPOTrainer

    from packmask.trl import PackedDPOTrainer

    for loss_type, mode in [("sigmoid", "keep_end"), ("sft", "keep_start")]:
        (_, a), (_, b) = (run_dpo(cls, loss_type, tmp_path, truncation_mode=mode, steps=1)
                          for cls in (PackedDPOTrainer, DPOTrainer))
        assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-5), loss_type


def test_packed_dpo_refusals(tmp_path):
    from datasets import Dataset
    from trl import DPOConfig

    from packmask.trl import PackedDPOTrainer

    base = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False)
    data = Dataset.from_list(preference_data(2))
    with pytest.raises(PackmaskError, match="ld_alpha"):
        PackedDPOTrainer(model=tiny_model("llama"), args=DPOConfig(**base, ld_alpha=0.5), train_dataset=data,
                         processing_class=tiny_tokenizer())
    with pytest.raises(PackmaskError, match="use_weighting"):
        PackedDPOTrainer(model=tiny_model("llama"), args=DPOConfig(**base, use_weighting=True), train_dataset=data,
                         processing_class=tiny_tokenizer())
    with pytest.raises(PackmaskError, match="attn_implementation"):
        PackedDPOTrainer(model=tiny_model("llama", attn_implementation="eager"),
                         ref_model=tiny_model("llama", attn_implementation="eager"), args=DPOConfig(**base),
                         train_dataset=data, processing_class=tiny_tokenizer())


def grpo_trainer(cls, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig

    args = GRPOConfig(output_dir=str(tmp_path / cls.__name__), report_to=[], use_cpu=True, bf16=False,
                      per_device_train_batch_size=4, num_generations=4, max_completion_length=8, temperature=0.7)
    return cls(model=tiny_model("llama", attn_implementation="packmask"), reward_funcs=lambda completions, **kw: [0.0] * len(completions),
               args=args, train_dataset=Dataset.from_dict({"prompt": ["t5 t6", "t7"]}), processing_class=tiny_tokenizer())


def test_packed_grpo_logps_equal_trl(tmp_path):
    from trl import GRPOTrainer

    from packmask.trl import PackedGRPOTrainer

    g = torch.Generator().manual_seed(0)
    # two prompts (left-padded to 5) x 4 completions (right-padded to 7), TRL's generation batch layout
    prompts = [[0, 0, 5, 6, 7], [0, 9, 10, 11, 12]]
    rows, masks = [], []
    for p in prompts:
        for _ in range(4):
            n = int(torch.randint(1, 8, (1,), generator=g))
            comp = torch.randint(3, VOCAB, (7,), generator=g).tolist()
            rows.append(p + comp[:n] + [0] * (7 - n))
            masks.append([int(t != 0) for t in p] + [1] * n + [0] * (7 - n))
    input_ids, attention_mask = torch.tensor(rows), torch.tensor(masks)
    packed, plain = grpo_trainer(PackedGRPOTrainer, tmp_path), grpo_trainer(GRPOTrainer, tmp_path)
    lp, ent, _ = packed._get_per_token_logps_and_entropies(packed.model, input_ids, attention_mask, 7,
                                                           compute_entropy=True)
    ref_lp, ref_ent, _ = plain._get_per_token_logps_and_entropies(plain.model, input_ids, attention_mask, 7,
                                                                  compute_entropy=True)
    valid = attention_mask[:, -7:].bool()
    assert rel_err(lp[valid], ref_lp[valid]) < 1e-5 and rel_err(ent[valid], ref_ent[valid]) < 1e-5
    assert (lp[~valid] == 0).all() and (ref_lp[~valid] == 0).all()
    # gradients flow the same way
    lp_sum = packed._get_per_token_logps_and_entropies(packed.model, input_ids, attention_mask, 7)[0].sum()
    lp_sum.backward()
    plain._get_per_token_logps_and_entropies(plain.model, input_ids, attention_mask, 7)[0].sum().backward()
    from packmask.testing import grad_rel_err
    assert grad_rel_err(packed.model, plain.model)[0] < 1e-5


def test_every_supported_loss_type_one_batch(tmp_path):
    """All loss types of TRL 1.16 on one batch: TRL's loss from padded rows == ours from packed rows."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from packmask.trl import SUPPORTED_DPO_LOSSES, PackedDPOTrainer

    losses = {}
    for cls, impl in ((PackedDPOTrainer, "packmask"), (DPOTrainer, "eager")):
        args = DPOConfig(output_dir=str(tmp_path / cls.__name__), report_to=[], use_cpu=True, bf16=False, beta=0.5,
                         max_length=14, label_smoothing=1e-3, loss_type=["sigmoid"])
        model = tiny_model("llama", attn_implementation=impl)
        ref = tiny_model("llama", attn_implementation=impl, seed=1)        # a different reference: nonzero ratios
        trainer = cls(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(preference_data()),
                      processing_class=tiny_tokenizer())
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
        for loss_type in SUPPORTED_DPO_LOSSES:
            trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
            with torch.no_grad():
                losses.setdefault(loss_type, []).append(trainer.compute_loss(model, batch).item())
    for loss_type, (ours, theirs) in losses.items():
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7), (loss_type, ours, theirs)


def test_packed_grpo_trains_like_trl(tmp_path):
    """Two GRPO steps end to end (generation unchanged, two iterations so the old-policy pass runs too):
    same losses and weights as trl.GRPOTrainer, and the tree path was taken."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from packmask.trl import PackedGRPOTrainer
    from packmask.trl import grpo as packed_grpo

    packed_calls = []

    class Spy(PackedGRPOTrainer):
        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *a, **k):
            packed_calls.append(packed_grpo.group_rows(input_ids, attention_mask, logits_to_keep) is not None)
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *a, **k)

    runs = []
    for cls in (Spy, GRPOTrainer):
        torch.manual_seed(0)
        args = GRPOConfig(output_dir=str(tmp_path / cls.__name__), report_to=[], use_cpu=True, bf16=False,
                          per_device_train_batch_size=4, num_generations=4, max_completion_length=6, max_steps=2,
                          learning_rate=0.1, optim="sgd", logging_steps=1, seed=0, beta=0.0, num_iterations=2,
                          disable_tqdm=True)
        trainer = cls(model=tiny_model("llama", attn_implementation="packmask"),
                      reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions], args=args,
                      train_dataset=Dataset.from_dict({"prompt": ["t5 t6", "t7", "t9 t10 t11", "t12"]}),
                      processing_class=tiny_tokenizer())
        trainer.train()
        runs.append((trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]))
    (pt, pl), (tt, tl) = runs
    assert len(pl) == 2 and pl == pytest.approx(tl, rel=1e-5, abs=1e-7)
    pp = dict(pt.model.named_parameters())
    assert max(rel_err(pp[n].detach(), p.detach()) for n, p in tt.model.named_parameters()) < 1e-5
    assert packed_calls and all(packed_calls)
