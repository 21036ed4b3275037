"""TRL's SFTTrainer with MultimodalCollator: samples already processed (one per feature), dataset
preparation skipped, the collator packs. One SGD step equals the samples-alone gradient step."""
import datasets
import pytest
import torch

trl = pytest.importorskip("trl")

from packmask.multimodal import MultimodalCollator  # noqa: E402
from packmask.multimodal.tiny import tiny_vlm  # noqa: E402
from packmask.multimodal.verify import random_samples  # noqa: E402

LR = 0.5


def test_sft_trainer_step_equals_samples_alone(tmp_path):
    from packmask.cli.demo import build_demo_tokenizer

    model = tiny_vlm("gemma3")  # a [B, N, N]-mask family through TRL
    samples = random_samples(model, 4, seed=4)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    # bf16=False: SFTConfig turns bf16 autocast on by default, which a 1e-5 comparison would catch
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=len(samples),
                         learning_rate=LR, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
                         max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                         disable_tqdm=True, dataloader_num_workers=0, seed=0, remove_unused_columns=False,
                         dataset_kwargs={"skip_prepare_dataset": True}, bf16=False)
    # a datasets.Dataset of processed samples, read back as tensors (TRL takes no plain list)
    dataset = datasets.Dataset.from_list(samples).with_format("torch")
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset,
                             processing_class=build_demo_tokenizer(vocab_size=200),
                             data_collator=MultimodalCollator(model))
    trainer.train()
    # reference: each sample alone on eager, the loss averaged over all scored tokens
    ref = tiny_vlm("gemma3", attn_implementation="eager").train()
    total, count = 0.0, 0
    for s in samples:
        n = int((s["labels"][:, 1:] != -100).sum())
        total, count = total + ref(**s, use_cache=False).loss * n, count + n
    (total / count).backward()
    wanted = {n: -LR * p.grad for n, p in ref.named_parameters() if p.grad is not None}
    scale = 1e-4 * max(float(u.norm()) for u in wanted.values())
    errors = {n: float((p.detach() - initial[n] - wanted[n]).norm()) / max(float(wanted[n].norm()), scale)
              for n, p in model.named_parameters() if n in wanted}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-5, (worst, errors[worst])
    assert any(n.startswith("model.vision_tower.") for n in wanted)  # the vision tower's gradients compared too
    # control: the packed row without packmask's per-sample mask and positions (one sequence) moves them differently
    naive = tiny_vlm("gemma3").train()
    batch = {k: v for k, v in MultimodalCollator(naive)(samples).items() if k not in ("attention_mask", "position_ids")}
    naive(**batch).loss.backward()
    assert max(float((-LR * p.grad - wanted[n]).norm()) / max(float(wanted[n].norm()), scale)
               for n, p in naive.named_parameters() if n in wanted) > 1e-2
