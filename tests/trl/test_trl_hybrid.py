"""PackedDPOTrainer / PackedGRPOTrainer on a hybrid model (a tiny Qwen3.5: Gated DeltaNet + attention) against
TRL's own trainers (CPU, fp32). The tree rows run each root-to-leaf path through the recurrent layers
(packmask.recurrent.tree_paths); TRL runs prompt + answer padded, one per row."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

import packmask  # noqa: E402,F401  (registers the "packmask" attention)
from packmask import support  # noqa: E402
from packmask.recurrent import installed, uninstall  # noqa: E402
from packmask.testing import grad_rel_err, rel_err, tiny_model  # noqa: E402

from _float64 import GATE_PARAMETERS, double, float64_everywhere  # noqa: E402  (tests/_float64.py)
from _trl_data import VOCAB, counting_tree_calls, preference_data, tiny_tokenizer  # noqa: E402  (tests/_trl_data.py)

FAMILY = "qwen3_5_text"


def _dpo(trainer_cls, impl, tmp_path, steps=2):
    from datasets import Dataset
    from trl import DPOConfig

    model, ref = tiny_model(FAMILY, attn_implementation=impl), tiny_model(FAMILY, attn_implementation=impl, seed=1)
    # SGD: the update is linear in the gradient, so equal weights after the steps certify equal gradients
    args = DPOConfig(output_dir=str(tmp_path / trainer_cls.__name__), per_device_train_batch_size=4, max_steps=steps,
                     learning_rate=0.1, optim="sgd", logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                     bf16=False, loss_type=["sigmoid"], beta=0.5, seed=0, max_length=14, dataloader_num_workers=0,
                     disable_tqdm=True)
    trainer = trainer_cls(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(preference_data()),
                          processing_class=tiny_tokenizer())
    trainer.train()
    return trainer, [h for h in trainer.state.log_history if "loss" in h]


def test_packed_dpo_on_a_hybrid_equals_trl(tmp_path):
    from trl import DPOTrainer

    from packmask.trl import PackedDPOTrainer

    (pt, plogs), (tt, tlogs) = _dpo(PackedDPOTrainer, "packmask", tmp_path), _dpo(DPOTrainer, "eager", tmp_path)
    assert installed(pt.model), "the Gated DeltaNet layers run per root-to-leaf path"
    assert len(plogs) == len(tlogs) == 2
    for a, b in zip(plogs, tlogs):
        for key in ("loss", "logps/chosen", "logps/rejected", "rewards/accuracies"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a[key], b[key])
    theirs = dict(tt.model.named_parameters())
    assert max(rel_err(p.detach(), theirs[n].detach()) for n, p in pt.model.named_parameters()) < 1e-5
    moved = max(rel_err(p.detach(), q.detach()) for p, q in zip(pt.model.parameters(), tiny_model(FAMILY).parameters()))
    assert moved > 1e-3  # training changed the weights, so equal weights mean equal gradients


def _grpo(cls, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig

    args = GRPOConfig(output_dir=str(tmp_path / cls.__name__), report_to=[], use_cpu=True, bf16=False,
                      per_device_train_batch_size=4, num_generations=4, max_completion_length=8, temperature=0.7)
    return cls(model=tiny_model(FAMILY, attn_implementation="packmask"),
               reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
               train_dataset=Dataset.from_dict({"prompt": ["t5 t6", "t7"]}), processing_class=tiny_tokenizer())


def _grpo_rows():
    """TRL's generation batch layout: 2 prompts (left-padded to 5) x 4 completions (right-padded to 7)."""
    g = torch.Generator().manual_seed(0)
    rows, masks = [], []
    for p in ([0, 0, 5, 6, 7], [0, 9, 10, 11, 12]):
        for _ in range(4):
            n = int(torch.randint(1, 8, (1,), generator=g))
            comp = torch.randint(3, VOCAB, (7,), generator=g).tolist()
            rows.append(p + comp[:n] + [0] * (7 - n))
            masks.append([int(t != 0) for t in p] + [1] * n + [0] * (7 - n))
    return torch.tensor(rows), torch.tensor(masks)


def test_packed_grpo_logps_on_a_hybrid_equal_trl(tmp_path, monkeypatch):
    """GRPO's log-prob pass: 2 prompts x 4 completions as 2 trees (TRL: 8 left/right-padded rows); log-probs,
    entropies and the gradient of their sum. Control: the same trees through the mixers' original forwards
    (a completion continues its sibling's recurrent state) differ."""
    from trl import GRPOTrainer

    from packmask.trl import PackedGRPOTrainer

    input_ids, attention_mask = _grpo_rows()
    packed, plain = _grpo(counting_tree_calls(PackedGRPOTrainer), tmp_path), _grpo(GRPOTrainer, tmp_path)
    lp, ent, _ = packed._get_per_token_logps_and_entropies(packed.model, input_ids, attention_mask, 7,
                                                           compute_entropy=True)
    ref_lp, ref_ent, _ = plain._get_per_token_logps_and_entropies(plain.model, input_ids, attention_mask, 7,
                                                                  compute_entropy=True)
    assert installed(packed.model) and type(packed).tree_calls > 0  # the tree path ran, not TRL's own
    valid = attention_mask[:, -7:].bool()
    assert rel_err(lp[valid], ref_lp[valid]) < 1e-5 and rel_err(ent[valid], ref_ent[valid]) < 1e-5
    packed._get_per_token_logps_and_entropies(packed.model, input_ids, attention_mask, 7)[0].sum().backward()
    plain._get_per_token_logps_and_entropies(plain.model, input_ids, attention_mask, 7)[0].sum().backward()
    theirs = dict(plain.model.named_parameters())
    errors = {n: rel_err(p.grad, theirs[n].grad) for n, p in packed.model.named_parameters() if p.grad is not None}
    # the gates' fp32 gradients are ill-conditioned sums (tests/_float64.py): checked in float64 below
    worst = max((e, n) for n, e in errors.items() if not n.endswith(GATE_PARAMETERS))
    assert worst[0] < 1e-5, worst

    with torch.no_grad():  # control: the mixers' original forwards over the tree rows
        assert uninstall(packed.model) > 0
        monkeypatch.setattr(support, "_runs_per_sequence", lambda m: True)  # let the packed input through
        wrong = packed._get_per_token_logps_and_entropies(packed.model, input_ids, attention_mask, 7)[0]
    assert rel_err(wrong[valid], ref_lp[valid]) > 1e-3  # 100x the bound above (2.5e-3 here: random-init log-probs
    # sit near -log(vocab) whatever the context, so contamination moves them little)


def test_packed_grpo_gradients_on_a_hybrid_in_float64(tmp_path, monkeypatch):
    """The gradient comparison in float64 throughout, every parameter (the Gated DeltaNet's gates included),
    against each prompt + completion run alone (TRL's fused log-prob head computes in float32)."""
    import torch.nn.functional as F

    from packmask.trl import PackedGRPOTrainer

    float64_everywhere(monkeypatch)
    input_ids, attention_mask = _grpo_rows()
    packed = _grpo(PackedGRPOTrainer, tmp_path)
    packed.model = packed.model_wrapped = double(packed.model)
    alone = double(tiny_model(FAMILY))  # the same weights (tiny_model is seeded), never packed
    lp = packed._get_per_token_logps_and_entropies(packed.model, input_ids, attention_mask, 7)[0]
    assert lp.dtype == torch.float64
    lp.sum().backward()
    total = 0.0
    for ids, mask in zip(input_ids, attention_mask.bool()):
        real = ids[mask]
        n = int(mask[-7:].sum())
        logits = alone(input_ids=real[None], use_cache=False).logits[0, -n - 1:-1] / packed.temperature
        ref = F.log_softmax(logits, -1).gather(-1, real[-n:, None])[:, 0]
        total = total + ref.sum()
    assert rel_err(lp.sum(), total) < 1e-12
    total.backward()
    err, name = grad_rel_err(packed.model, alone)
    assert err < 1e-10, (name, err)
