"""PackedDPOTrainer on vision-language preference examples (a prompt's processor output + chosen_ids /
rejected_ids): the trainer's loss and every parameter gradient, vision tower included, equal DPO computed
on each prompt+answer path run alone (policy and reference), fp32 CPU; a control (answers that see their
siblings) differs; a training run steps."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("trl")

import packmask  # noqa: E402,F401
from packmask.errors import PackmaskError  # noqa: E402
from packmask.multimodal.tiny import tiny_vlm  # noqa: E402
from packmask.multimodal.tree import MultimodalTreeCollator  # noqa: E402
from packmask.multimodal.tree_verify import control_batch, path_features, random_preference_examples  # noqa: E402
from packmask.multimodal.verify import grad_dict_rel_err, param_grads  # noqa: E402
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

    extra = {"max_length": None, **extra}
    return DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, learning_rate=0.1, optim="sgd",
                     report_to=[], use_cpu=True, save_strategy="no", bf16=False, gradient_checkpointing=False,
                     loss_type=["sigmoid"], beta=BETA, seed=0, dataloader_num_workers=0,
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
    grad, name = grad_dict_rel_err(param_grads(model), want_grads)
    assert rel_err(loss.detach(), want_loss) <= 1e-5 and grad <= 1e-5, (float(loss), float(want_loss), grad, name)
    assert any("visual" in n or "vision" in n for n in want_grads)
    model.zero_grad(set_to_none=True)  # the control: answers that see their siblings give other gradients
    trainer.compute_loss(model, control_batch(batch, "siblings")).backward()
    assert grad_dict_rel_err(param_grads(model), want_grads)[0] > 1e-2


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


def _gemma3_processor():
    """A real Gemma3Processor built offline: the PIL image processor and a word-level tokenizer whose
    image tokens are the tiny model's (the processor expands each <start_of_image> into the image span)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from packmask.multimodal.tiny import IMG, VE, VS

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 96)}, "<image_soft_token>": IMG,
             "<start_of_image>": VS, "<end_of_image>": VE}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  extra_special_tokens={"image_token": "<image_soft_token>",
                                                        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"})
    image_processor = next(getattr(transformers, n)(size={"height": 16, "width": 16})
                           for n in ("Gemma3ImageProcessorPil", "Gemma3ImageProcessor") if hasattr(transformers, n))
    return transformers.Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=4)


def test_packed_dpo_vlm_matches_trl_dpo_trainer(tmp_path):
    """TRL's own vision DPO (raw images processed on the fly, padded rows, eager) against PackedDPOTrainer
    on the same examples processed one prompt at a time: the same losses for 2 SGD steps, the same weights."""
    import random

    import numpy as np
    from datasets import Dataset
    from PIL import Image
    from trl import DPOTrainer

    from packmask.trl import PackedDPOTrainer

    processor = _gemma3_processor()
    rng, r = np.random.default_rng(0), random.Random(0)
    words = lambda n: " ".join(f"t{r.randrange(3, 96)}" for _ in range(n))  # noqa: E731
    rows = []
    for n_images in (1, 2, 0):
        images = [Image.fromarray((rng.random((20, 28, 3)) * 255).astype("uint8")) for _ in range(n_images)]
        prompt = words(2) + "".join(" <start_of_image> " + words(1) for _ in images) + " " + words(3)
        rows.append(dict(images=images, prompt=prompt, chosen=" " + words(r.randint(1, 5)),
                         rejected=" " + words(r.randint(1, 5))))
    trl_model, trl_ref = tiny_vlm("gemma3", "eager"), tiny_vlm("gemma3", "eager", seed=1)
    padded = DPOTrainer(model=trl_model, ref_model=trl_ref, args=_args(tmp_path / "trl", max_steps=2, logging_steps=1),
                        train_dataset=Dataset.from_list(rows), processing_class=processor)
    padded.train()
    examples = []
    for row in rows:
        prompt = dict(processor(text=[row["prompt"]], images=[row["images"]] if row["images"] else None,
                                return_tensors="pt", add_special_tokens=False))
        prompt.pop("num_crops", None)
        tok = processor.tokenizer
        examples.append(dict(prompt, chosen_ids=tok(row["chosen"], add_special_tokens=False).input_ids,
                             rejected_ids=tok(row["rejected"], add_special_tokens=False).input_ids))
    model = tiny_vlm("gemma3")
    packed = PackedDPOTrainer(model=model, ref_model=tiny_vlm("gemma3", seed=1),
                              args=_args(tmp_path / "packed", max_steps=2, logging_steps=1),
                              train_dataset=_dataset(examples), processing_class=processor.tokenizer)
    packed.train()
    logs = [[h for h in t.state.log_history if "loss" in h] for t in (packed, padded)]
    assert len(logs[0]) == len(logs[1]) == 2
    for a, b in zip(*logs):
        for key in ("loss", "logps/chosen", "logps/rejected", "num_tokens"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a[key], b[key])
    weights = lambda m: {n: p.detach() for n, p in m.named_parameters()}  # noqa: E731
    assert grad_dict_rel_err(weights(model), weights(trl_model))[0] < 1e-5   # (floored like gradients: zero-init norms)
    assert grad_dict_rel_err(weights(model), weights(tiny_vlm("gemma3")))[0] > 1e-3  # training moved them


def test_packed_dpo_vlm_precomputed_reference_and_plain_lists(tmp_path):
    """precompute_ref_log_probs=True (TRL adds the columns, which drops the dataset's torch format: the
    collator then reads nested lists) gives the loss of the reference run on the fly; so does a dataset
    stored without with_format("torch"). Control: the reference differs from the policy (loss != ln 2)."""
    from datasets import Dataset

    from packmask.trl import PackedDPOTrainer

    examples = random_preference_examples(_model("qwen2_5_vl"), 3)
    losses = []
    for extra, data in (({}, _dataset(examples)), ({"precompute_ref_log_probs": True}, _dataset(examples)),
                        ({}, Dataset.from_list(examples))):
        trainer = PackedDPOTrainer(model=_model("qwen2_5_vl"), ref_model=_model("qwen2_5_vl", seed=1),
                                   args=_args(tmp_path, max_steps=1, logging_steps=1, **extra), train_dataset=data,
                                   processing_class=tiny_tokenizer())
        trainer.train()
        losses.append(next(h["loss"] for h in trainer.state.log_history if "loss" in h))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == pytest.approx(losses[0], rel=1e-5), losses
    assert abs(losses[0] - math.log(2)) > 1e-4


def test_packed_dpo_vlm_refuses_keep_end(tmp_path):
    """TRL refuses keep_end on vision-language data (it would cut the prompt's image tokens); so does
    PackedDPOTrainer, whose tree collator only cuts answers at their end. Control: keep_start is taken."""
    from packmask.trl import PackedDPOTrainer

    model = _model("qwen2_5_vl")
    data = _dataset(random_preference_examples(model, 2))
    with pytest.raises(PackmaskError, match="keep_end"):
        PackedDPOTrainer(model=model, ref_model=_model("qwen2_5_vl", seed=1), train_dataset=data,
                         args=_args(tmp_path, max_length=64, truncation_mode="keep_end"),
                         processing_class=tiny_tokenizer())
    PackedDPOTrainer(model=model, ref_model=_model("qwen2_5_vl", seed=1), train_dataset=data,
                     args=_args(tmp_path, max_length=64, truncation_mode="keep_start"), processing_class=tiny_tokenizer())
