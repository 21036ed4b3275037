"""Run under ``accelerate launch`` with 2 CPU processes: the HF Trainer on packed rows vs one process.

Three Trainer runs in one process group, each 3 optimizer steps x 2 accumulated micro-batches of 2
packed rows per process (tiny fp32 Llama, ``attn_implementation="packmask"``, SGD, no clipping), rows
dealt by ``PackedTrainerMixin``'s balanced sampler:

  trainer-token           PackedTrainerMixin's per-token loss and count
  trainer-sequence        PackedTrainerMixin's per-sequence loss and count
  trainer-native-token    balanced sampler, but the Trainer's own ``num_items_in_batch`` and the
                          model's own loss (transformers' ForCausalLMLoss on PackedCollator labels)

Each is compared with ``distributed_worker.reference_updates`` (one process, same documents unpacked
in one big batch per step). Rank 0 writes JSON.

    accelerate launch --multi_gpu --num_processes 2 tests/distributed/distributed_trainer_worker.py OUT.json
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from distributed_worker import ACCUM, BATCH, LR, STEPS, flat, make_rows, reference_updates  # noqa: E402

import packmask  # noqa: E402
from packmask.distributed import BalancedBatchSampler, PackedTrainerMixin  # noqa: E402
from packmask.testing import tiny_model  # noqa: E402
from _teardown import finish_process

SEED = 3


def run(config: str, rows, out_dir: str):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    reduction = None if "native" in config else config.split("-")[-1]

    class PackedTrainer(PackedTrainerMixin, Trainer):
        packmask_loss_reduction = reduction

    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM, max_steps=STEPS,
        learning_rate=LR, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        warmup_steps=0, remove_unused_columns=False, report_to=[], save_strategy="no", logging_strategy="no",
        use_cpu=True, seed=0, data_seed=SEED, dataloader_drop_last=True, disable_tqdm=True)
    model = tiny_model("llama").train()
    trainer = PackedTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                            data_collator=packmask.PackedCollator())
    trainer.train()
    return flat({n: p.detach().clone() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()})


def main():
    out_path = sys.argv[1]
    torch.set_num_threads(1)
    rows = make_rows()
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    plan_steps = BalancedBatchSampler([r["seq_lengths"] for r in rows], BATCH, world_size=world, rank=None, seed=SEED,
                                      window_steps=PackedTrainerMixin.packmask_window_steps).steps(epoch=0)
    plan = [[plan_steps[m, r].tolist() for m in range(STEPS * ACCUM)] for r in range(world)]
    initial = flat({n: p.detach() for n, p in tiny_model("llama", attn_implementation="sdpa").named_parameters()})
    results, references = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in ("trainer-token", "trainer-sequence", "trainer-native-token"):
            packed = run(config, rows, tmp)
            if rank == 0:
                reduction = config.split("-")[-1]
                if reduction not in references:
                    references[reduction] = flat(reference_updates(rows, plan, reduction))
                ref = references[reduction]
                results[config] = {"param_rel_err": ((packed - ref).norm() / ref.norm()).item(),
                                   "update_rel_err": ((packed - ref).norm() / (ref - initial).norm()).item()}
    if rank == 0:
        import accelerate
        import transformers
        results["_meta"] = {"world_size": world, "accelerate": accelerate.__version__,
                            "transformers": transformers.__version__}
        with open(out_path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(out_path + ".tmp", out_path)


if __name__ == "__main__":
    main()
    finish_process(0)
