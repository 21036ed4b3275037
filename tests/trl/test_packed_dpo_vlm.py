"""PackedDPOTrainer on vision-language preference examples (a prompt's processor output + chosen_ids /
rejected_ids): the trainer's loss and every parameter gradient, vision tower included, equal DPO computed
on each prompt+answer path run alone (policy and reference), fp32 CPU; a control (answers that see their
siblings) differs; a training run steps."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("trl")

import packmask  # noqa: E402,F401
from packmask.errors import PackmaskError  # noqa: E402
from packmask.multimodal.tiny import tiny_vlm  # noqa: E402
from packmask.multimodal.tree import MultimodalTreeCollator  # noqa: E402
from packmask.multimodal.tree_verify import control_batch, path_features, random_preference_examples  # noqa: E402
from packmask.multimodal.verify import grad_rel_err, param_grads  # noqa: E402
from packmask.testing import rel_err  # noqa: E402

from _trl_data import tiny_tokenizer  # noqa: E402  (tests/_trl_data.py)

BETA = 0.5


def _model(family, seed=0):
    model = tiny_vlm(family, seed=seed)
    with torch.no_grad():  # attention that matters, so the control differs clearly (see test_multimodal_tree.py)
        for name, p in model.named_parameters():
            if "language_model" in name and any(k in name for k in ("q_proj", "k_proj", "o_proj")):
                p.mul_(4)
    return model


def _args(tmp_path, **extra):
    from trl import DPOConfig

    return DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, learning_rate=0.1, optim="sgd",
                     report_to=[], use_cpu=True, save_strategy="no", bf16=False, gradient_checkpointing=False,
                     loss_type=["sigmoid"], beta=BETA, seed=0, max_length=None, dataloader_num_workers=0,
                     disable_tqdm=True, remove_unused_columns=False, **extra)


def _dataset(examples):
    """The processed examples as a datasets.Dataset read back as tensors (what a user stores)."""
    from datasets import Dataset

    return Dataset.from_list(examples).with_format("torch")


def _path_sums(model, examples, answer_type):
    sums = []
    for key in ("chosen_ids", "rejected_ids"):
        for ex in examples:
            P = ex["input_ids"].shape[1]
            logits = model(**path_features(ex, ex[key], answer_type), use_cache=False).logits[0, P - 1:-1]
            sums.append(logits.log_softmax(-1).gather(1, torch.tensor(ex[key])[:, None]).sum())
    return torch.stack(sums)


def _reference_dpo(model, ref_model, examples, answer_type):
    """DPO's sigmoid loss on every prompt+answer path alone (eager), and the policy's gradients."""
    E = len(examples)
    model.set_attn_implementation("eager")
    ref_model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            ref = _path_sums(ref_model, examples, answer_type)
        model.zero_grad(set_to_none=True)
        pol = _path_sums(model, examples, answer_type)
        loss = -F.logsigmoid(BETA * ((pol[:E] - ref[:E]) - (pol[E:] - ref[E:]))).mean()
        loss.backward()
        return loss.detach(), param_grads(model)
    finally:
        model.set_attn_implementation("packmask")
        ref_model.set_attn_implementation("packmask")
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_packed_dpo_trainer_vlm_loss_and_grads(family, tmp_path):
    from packmask.trl import PackedDPOTrainer

    model, ref_model = _model(family), _model(family, seed=1)
    examples = random_preference_examples(model, 3, seed=2)
    trainer = PackedDPOTrainer(model=model, ref_model=ref_model, args=_args(tmp_path), train_dataset=_dataset(examples),
                               processing_class=tiny_tokenizer())
    assert isinstance(trainer.data_collator, MultimodalTreeCollator)
    want_loss, want_grads = _reference_dpo(model, ref_model, examples, trainer.data_collator.answer_type)
    batch = trainer.data_collator(examples)
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grad, name = grad_rel_err(param_grads(model), want_grads)
    assert rel_err(loss.detach(), want_loss) <= 1e-5 and grad <= 1e-5, (float(loss), float(want_loss), grad, name)
    assert any("visual" in n or "vision" in n for n in want_grads)
    model.zero_grad(set_to_none=True)  # the control: answers that see their siblings give other gradients
    trainer.compute_loss(model, control_batch(batch, "siblings")).backward()
    assert grad_rel_err(param_grads(model), want_grads)[0] > 1e-2


def test_packed_dpo_trainer_vlm_trains(tmp_path):
    from packmask.trl import PackedDPOTrainer

    model, ref_model = _model("qwen2_5_vl"), _model("qwen2_5_vl", seed=1)
    examples = random_preference_examples(model, 3, seed=4)
    want_loss, _ = _reference_dpo(model, ref_model, examples, 0)
    trainer = PackedDPOTrainer(model=model, ref_model=ref_model, args=_args(tmp_path, max_steps=2, logging_steps=1),
                               train_dataset=_dataset(examples), processing_class=tiny_tokenizer())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    assert logs[0]["loss"] == pytest.approx(float(want_loss), rel=1e-5)  # one batch of all 3: order-free mean
    assert logs[0]["packed_tokens"] < logs[0]["num_tokens"]  # prompts and their images stored once


def test_packed_dpo_trainer_vlm_refusals(tmp_path):
    from packmask.trl import PackedDPOTrainer

    model = tiny_vlm("qwen2_5_vl")
    examples = random_preference_examples(model, 2)
    with pytest.raises(PackmaskError, match="raw image datasets"):
        PackedDPOTrainer(model=model, ref_model=tiny_vlm("qwen2_5_vl"), args=_args(tmp_path),
                         train_dataset=_dataset([{"images": [], "prompt": "a", "chosen": "b", "rejected": "c"}]),
                         processing_class=tiny_tokenizer())
    collator = MultimodalTreeCollator(model, max_length=int(examples[0]["input_ids"].shape[1]))
    with pytest.raises(PackmaskError, match="never cut"):
        collator(examples[:1])
    cut = MultimodalTreeCollator(model, max_length=int(examples[0]["input_ids"].shape[1]) + 1)(examples[:1])
    assert cut["branch_length"].tolist() == [1, 1]  # answers cut at their ends, as TRL's keep_start
