"""The HF Trainer with MultimodalCollator on a tiny Qwen2.5-VL: one SGD step on packed rows moves every
parameter (vision tower included) exactly as the gradient of the samples run one by one does."""
import torch
from transformers import Trainer, TrainingArguments

from packmask.multimodal import MultimodalCollator
from packmask.multimodal.tiny import tiny_vlm
from packmask.multimodal.verify import random_samples

LR = 0.5


def _reference_step(samples):
    """Each sample alone (sdpa), the loss averaged over all scored tokens, one SGD step by hand."""
    model = tiny_vlm("qwen2_5_vl", attn_implementation="sdpa").train()
    total, count = 0.0, 0
    for s in samples:
        out = model(**s, use_cache=False)
        n = int((s["labels"][:, 1:] != -100).sum())
        total, count = total + out.loss * n, count + n
    (total / count).backward()
    return {n: (p - LR * p.grad).detach() for n, p in model.named_parameters()}, float(total.detach() / count)


def test_trainer_step_equals_samples_alone(tmp_path):
    model = tiny_vlm("qwen2_5_vl")
    samples = random_samples(model, 6, seed=2)
    longest = max(s["input_ids"].shape[1] for s in samples)
    collator = MultimodalCollator(model, max_length=max(longest, sum(s["input_ids"].shape[1] for s in samples) // 2))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=len(samples),
                             learning_rate=LR, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
                             max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0, seed=0, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=samples, data_collator=collator)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] >= 2 and batch["position_ids"].shape[0] == 4  # packed rows, [4, B, L]
    initial = dict(tiny_vlm("qwen2_5_vl").named_parameters())
    trainer.train()
    expected, ref_loss = _reference_step(samples)
    # the update (LR x the gradient), relative to its own size, floored at 1e-4 x the largest (zero-gradient noise)
    wanted = {n: (expected[n] - initial[n]).detach() for n in expected}
    scale = 1e-4 * max(float(u.norm()) for u in wanted.values())
    errors = {n: float((p.detach() - initial[n] - wanted[n]).norm()) / max(float(wanted[n].norm()), scale)
              for n, p in model.named_parameters()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-5, (worst, errors[worst])
    assert any(n.startswith("model.visual.") and float(u.norm()) > 0 for n, u in wanted.items())
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert abs(logged[0] - ref_loss) <= 1e-3 * ref_loss  # the Trainer logs the loss rounded
    # control: the same rows without packmask's per-sample positions (the model numbers each row as one sequence)
    naive = tiny_vlm("qwen2_5_vl").train()
    plain = {k: v for k, v in collator(samples).items() if k != "position_ids"}
    naive(**plain).loss.backward()
    worst_naive = max(float((-LR * p.grad - wanted[n]).norm()) / max(float(wanted[n].norm()), scale)
                      for n, p in naive.named_parameters() if p.grad is not None)
    assert worst_naive > 1e-2
