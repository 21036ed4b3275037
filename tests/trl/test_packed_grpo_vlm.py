"""PackedGRPOTrainer on vision-language rows (the prompt, its image tokens and its images once per group of
completions) against trl.GRPOTrainer on the same batch, in TRL's own layout: the rows and vision inputs a
real tiny processor gives (prompts with 1, 2 and 0 images, each repeated G times, left-padded) and
right-padded completions. Per-token log-probs and entropies of every completion token, the GRPO loss and
every parameter gradient (vision tower included) agree at 1e-5 (fp32 CPU); Qwen2.5-VL also against each
prompt + completion run alone. LLaVA-NeXT, Mistral 3 (``image_sizes``) and Idefics3 / SmolVLM (tiles,
``pixel_attention_mask``) take the tree path too (Mistral 3's batch built by hand). Controls: completions
that see their siblings, or positions restarting at 0, differ by > 1e-2. Rows that cannot be trees (image
tokens in a completion, PaliGemma, LFM2-VL / InternVL tiles) take TRL's path; two GRPO steps end to end give
TRL's losses and weights."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

import packmask  # noqa: E402,F401  (registers attn_implementation='packmask')
from packmask.errors import PackmaskError  # noqa: E402
from packmask.multimodal.collator import pad_cat  # noqa: E402
from packmask.multimodal.tiny import IMG, tiny_sample, tiny_vlm  # noqa: E402
from packmask.multimodal.tiny_processor import (processor_unavailable, tiny_image, tiny_processor,  # noqa: E402
                                               tiny_tokenizer)
from packmask.multimodal.tree import MultimodalTreeCollator, model_inputs  # noqa: E402
from packmask.multimodal.tree_verify import control_batch, path_features  # noqa: E402
from packmask.multimodal.verify import grad_dict_rel_err, param_grads  # noqa: E402
from packmask.testing import rel_err  # noqa: E402
from packmask.trl.grpo_vlm import completion_groups, vision_rows  # noqa: E402

G, K, TEMPERATURE = 3, 5, 0.7
IMAGE = {"qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>", "gemma3": "<start_of_image>", "llava": "<image>",
         "llava_next": "<image>", "idefics3": "<image>", "smolvlm": "<image>"}


def _model(family, impl="packmask"):
    model = tiny_vlm(family, impl)
    with torch.no_grad():  # attention that matters, so the controls differ clearly (as test_packed_dpo_vlm.py)
        for name, p in model.named_parameters():
            text = "language_model" in name or "text_model" in name  # Idefics3 / SmolVLM: text_model
            if text and any(k in name for k in ("q_proj", "k_proj", "o_proj")):
                p.mul_(4)
            if name.endswith("mm_input_projection_weight"):  # Gemma 3 initializes it to 0: no vision gradients
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    return model


def _trainer(cls, model, processor, tmp_path, **extra):
    from datasets import Dataset
    from trl import GRPOConfig

    args = GRPOConfig(output_dir=str(tmp_path / cls.__name__), report_to=[], use_cpu=True, bf16=False,
                      per_device_train_batch_size=3 * G, num_generations=G, max_completion_length=K,
                      temperature=TEMPERATURE, beta=0.0, loss_type="grpo", **extra)
    return cls(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
               train_dataset=Dataset.from_dict({"prompt": ["w5"]}), processing_class=processor)


def _trl_batch(family, processor, seed=0):
    """TRL's log-prob inputs for 3 prompts (1, 2, 0 images) x G completions of 1..K tokens: the processor's
    left-padded rows and vision inputs, token types extended with zeros over the completions."""
    g = torch.Generator().manual_seed(seed)
    processor.tokenizer.padding_side = "left"
    img = IMAGE[family]
    texts = [f"w5 {img} w7 w8", f"w9 {img} w3 {img} w4 w6", "w11 w12 w13"]
    images = [[tiny_image(20, 28, 1)], [tiny_image(16, 16, 2), tiny_image(28, 20, 3)], []]
    out = processor(images=[i for i in images for _ in range(G)], text=[t for t in texts for _ in range(G)],
                    padding=True, return_tensors="pt")
    completion_ids, completion_mask = _completions(g)
    extra = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}
    for key in ("token_type_ids", "mm_token_type_ids"):
        if key in extra:
            extra[key] = torch.cat([extra[key], torch.zeros_like(completion_ids)], 1)
    extra["num_images"] = [len(i) for i in images for _ in range(G)]
    return dict(prompt_ids=out["input_ids"], prompt_mask=out["attention_mask"], completion_ids=completion_ids,
                completion_mask=completion_mask, **extra)


def _completions(g):
    """3 * G right-padded completions of 1..K tokens: ``(completion_ids, completion_mask)``."""
    B = 3 * G
    lengths = torch.randint(1, K + 1, (B,), generator=g)
    completion_ids = torch.randint(3, 96, (B, K), generator=g)
    completion_mask = (torch.arange(K)[None] < lengths[:, None]).long()
    return completion_ids * completion_mask, completion_mask


def _hand_batch(model, seed=0):
    """TRL's log-prob inputs built by hand where the family's processor cannot run here (Mistral 3's needs
    torchvision): 3 prompts (1, 2, 0 images of different sizes, :func:`tiny_sample`) x G, left-padded; the
    images of every row on dim 0, padded to the largest (``image_sizes`` crops them), as the processor
    batches them."""
    g = torch.Generator().manual_seed(seed)
    prompts = [tiny_sample(model, 4, n, g) for n in (1, 2, 0)]
    rows = [p for p in prompts for _ in range(G)]
    P = max(p["input_ids"].shape[1] for p in prompts)
    pad = [P - p["input_ids"].shape[1] for p in rows]
    prompt_ids = torch.stack([torch.nn.functional.pad(p["input_ids"][0], (n, 0)) for p, n in zip(rows, pad)])
    prompt_mask = torch.stack([(torch.arange(P) >= n).long() for n in pad])
    vision = {k: pad_cat([p[k] for p in rows if k in p]) for k in ("pixel_values", "image_sizes")}
    completion_ids, completion_mask = _completions(g)
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, num_images=[len(p.get("image_sizes", ())) for p in rows],
                **vision)


def _logps(trainer, model, inputs, compute_entropy=True):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    mm = {k: v for k, v in inputs.items() if k not in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask",
                                                       "advantages", "num_items_in_batch")}
    return trainer._get_per_token_logps_and_entropies(model, ids, mask, K, compute_entropy=compute_entropy, **mm)


def _loss_and_grads(trainer, model, inputs):
    model.zero_grad(set_to_none=True)
    B = inputs["prompt_ids"].shape[0]
    full = dict(inputs, advantages=torch.linspace(-1.0, 1.0, B), num_items_in_batch=inputs["completion_mask"].sum())
    loss = trainer.compute_loss(model, full)
    loss.backward()
    return loss.detach(), param_grads(model)


def _family(family):
    """A family whose batch comes from its tiny processor, skipped with the reason where that processor
    cannot be built here (Idefics3 / SmolVLM on transformers 5.17: behind torchvision); Mistral 3's batch
    is built by hand and needs no processor."""
    missing = None if family == "mistral3" else processor_unavailable(family)
    return pytest.param(family, marks=pytest.mark.skipif(missing is not None, reason=missing or ""))


@pytest.mark.parametrize("family", [_family(f) for f in ("qwen2_5_vl", "gemma3", "llava", "llava_next", "idefics3",
                                                           "smolvlm", "mistral3")])
def test_packed_grpo_vlm_equals_trl(family, tmp_path):
    """LLaVA-NeXT (anyres patches, ``image_sizes``), Mistral 3 (images padded to the largest, ``image_sizes``;
    its batch built by hand) and Idefics3 / SmolVLM (tiles, ``pixel_attention_mask``, ``[rows, images, ...]``)
    take the tree path too: their vision inputs are cut per row by the family's ``image_dim``."""
    from trl import GRPOTrainer

    from packmask.trl import PackedGRPOTrainer

    processor = tiny_tokenizer(family) if family == "mistral3" else tiny_processor(family)
    packed = _trainer(PackedGRPOTrainer, _model(family), processor, tmp_path)
    plain = _trainer(GRPOTrainer, _model(family, "eager"), processor, tmp_path)
    inputs = _hand_batch(plain.model) if family == "mistral3" else _trl_batch(family, processor)
    valid = inputs["completion_mask"].bool()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    mm = {k: inputs[k] for k in inputs if k not in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
    chunks = packed._vlm_tree_chunks(packed.model, ids, mask, K, ids.shape[0], mm)
    assert chunks is not None and len(chunks) == 1
    tree = chunks[0][0](chunks[0][1])
    assert chunks[0][2] == list(range(ids.shape[0]))
    assert tree["input_ids"].numel() < ids.numel()  # the tree path: prompts and images once
    with torch.no_grad():
        lp, ent, _ = _logps(packed, packed.model, inputs)
        ref_lp, ref_ent, _ = _logps(plain, plain.model, inputs)
    assert rel_err(lp[valid], ref_lp[valid]) <= 1e-5 and rel_err(ent[valid], ref_ent[valid]) <= 1e-5
    assert (lp[~valid] == 0).all()
    row = max(ex["input_ids"].shape[1] + sum(map(len, ex["completion_ids"])) for ex in chunks[0][1])
    packed.row_length = row  # trees over several rows, and TRL's memory chunks of G rows: the same numbers
    with torch.no_grad():
        rows_lp, _, _ = packed._get_per_token_logps_and_entropies(packed.model, ids, mask, K, batch_size=G, **mm)
    assert rel_err(rows_lp[valid], ref_lp[valid]) <= 1e-5
    assert len(packed._vlm_tree_chunks(packed.model, ids, mask, K, G, mm)) == 3
    assert MultimodalTreeCollator(packed.model, row)(chunks[0][1])["input_ids"].shape[0] > 1
    packed.row_length = None
    loss, grads = _loss_and_grads(packed, packed.model, inputs)
    ref_loss, ref_grads = _loss_and_grads(plain, plain.model, inputs)
    grad, name = grad_dict_rel_err(grads, ref_grads)
    assert rel_err(loss, ref_loss) <= 1e-5 and grad <= 1e-5, (float(loss), float(ref_loss), grad, name)
    assert any(("visual" in n or "vision" in n) and g.abs().sum() > 0 for n, g in grads.items())
    # the controls: the same tree rows made wrong on purpose give other gradients (log-probs of a random
    # tiny model sit near log(1/vocab), so gradients show the difference more clearly than values)
    first = packed._tree_collator(packed.model, None).family.first_position
    adv = torch.linspace(-1.0, 1.0, valid.shape[0])[:, None] * valid
    for control in (None, "siblings", "positions"):
        batch = tree if control is None else control_batch(tree, control, first)
        packed.model.zero_grad(set_to_none=True)
        lp_batch, _ = packed._branch_logps(packed.model, model_inputs(batch), batch, K, False)
        (adv * lp_batch).sum().backward()
        if control is None:
            right = param_grads(packed.model)
        else:
            assert grad_dict_rel_err(param_grads(packed.model), right)[0] > 1e-2, control
    if family == "qwen2_5_vl":  # and each prompt + completion run alone (eager, the model's own positions)
        _each_alone(plain.model, inputs, ref_lp)


def _each_alone(model, inputs, want):
    B = inputs["prompt_ids"].shape[0]
    patches = inputs["image_grid_thw"].prod(-1)
    image, patch = 0, 0
    with torch.no_grad():
        for r in range(B):
            n = inputs["num_images"][r]
            keep = inputs["prompt_mask"][r].bool()
            example = dict(input_ids=inputs["prompt_ids"][r:r + 1, keep],
                           mm_token_type_ids=inputs["mm_token_type_ids"][r:r + 1, :keep.shape[0]][:, keep])
            if n:
                rows = int(patches[image:image + n].sum())
                example.update(pixel_values=inputs["pixel_values"][patch:patch + rows],
                               image_grid_thw=inputs["image_grid_thw"][image:image + n])
                image, patch = image + n, patch + rows
            c = int(inputs["completion_mask"][r].sum())
            answer = inputs["completion_ids"][r, :c].tolist()
            P = example["input_ids"].shape[1]
            logits = model(**path_features(example, answer), use_cache=False).logits[0, P - 1:-1] / TEMPERATURE
            got = logits.log_softmax(-1).gather(1, torch.tensor(answer)[:, None])[:, 0]
            assert rel_err(got, want[r, :c]) <= 1e-5, r


def test_packed_grpo_vlm_masked_and_fallback_rows(tmp_path):
    """A completion masked out whole (``mask_truncated_completions``) is no branch and keeps TRL's zeros;
    rows that cannot be trees run TRL's own (unshared, exact) method: a completion mask with a hole; no
    trees either for image tokens in a completion (a tool's image) or a prefix-LM (PaliGemma), whose
    completions TRL types as prefix."""
    from trl import GRPOTrainer

    from packmask.trl import PackedGRPOTrainer

    processor = tiny_processor("gemma3")
    packed = _trainer(PackedGRPOTrainer, _model("gemma3"), processor, tmp_path)
    plain = _trainer(GRPOTrainer, _model("gemma3", "eager"), processor, tmp_path)
    inputs = _trl_batch("gemma3", processor, seed=1)
    inputs["completion_mask"][1] = 0
    for hole in (False, True):
        if hole:
            inputs["completion_mask"][4, :3] = torch.tensor([1, 0, 1])
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        mm = {k: inputs[k] for k in inputs if k not in ("prompt_ids", "prompt_mask", "completion_ids",
                                                        "completion_mask")}
        chunks = packed._vlm_tree_chunks(packed.model, ids, mask, K, ids.shape[0], mm)
        assert chunks is None if hole else 1 not in chunks[0][2]
        with torch.no_grad():
            lp, ent, _ = _logps(packed, packed.model, inputs)
            ref, ref_ent, _ = _logps(plain, plain.model, inputs)
        valid = inputs["completion_mask"].bool()
        assert rel_err(lp[valid], ref[valid]) <= 1e-5 and rel_err(ent[valid], ref_ent[valid]) <= 1e-5
        assert (lp[1] == 0).all() and (ref[1] == 0).all()
    assert packed._tree_collator(tiny_vlm("paligemma"), None) is None
    rows = slice(6, 6 + G)  # the third prompt's group, a tree as it is; a tool's image in a completion: none
    vision = vision_rows(ids.shape[0], inputs["num_images"], inputs["pixel_values"])[rows]
    types = inputs["token_type_ids"][rows].clone()
    assert completion_groups(ids[rows], mask[rows], K, vision, {"token_type_ids": types}) is not None
    types[0, -K] = 1
    assert completion_groups(ids[rows], mask[rows], K, vision, {"token_type_ids": types}) is None
    # layouts still not cut per row give None (TRL's method): tile-indexed LFM2-VL / InternVL, and
    # inputs that do not go with the family's image_dim
    pixels, one = torch.zeros(3, 2, 4), torch.ones(3, 2)
    assert vision_rows(3, [1, 1, 1], pixels) is not None
    for image_dim, extra in ((0, dict(spatial_shapes=one)), (0, dict(num_tiles=[1, 1, 1])),
                             (0, dict(pixel_attention_mask=pixels)), (1, dict(image_sizes=one)), (2, {})):
        assert vision_rows(3, [1, 1, 1], pixels, image_dim=image_dim, **extra) is None, (image_dim, extra)
    assert vision_rows(3, [1, 1, 1], pixels[:2], image_dim=1) is None  # not one entry per row
    assert vision_rows(3, [1, 1], pixels, image_dim=1) is None


def test_packed_grpo_vlm_refuses_a_model_off_packmask(tmp_path):
    from packmask.trl import PackedGRPOTrainer

    with pytest.raises(PackmaskError, match="attn_implementation"):
        _trainer(PackedGRPOTrainer, tiny_vlm("gemma3", "eager"), tiny_processor("gemma3"), tmp_path)


def test_packed_grpo_vlm_trains_like_trl(tmp_path):
    """Two GRPO steps end to end on image prompts (TRL's generation, its processor pass over the images,
    an old-policy pass, SGD): PackedGRPOTrainer on trees logs trl.GRPOTrainer's losses and ends with its
    weights (Gemma 3, a real tiny processor), and every log-prob pass took the tree path."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from packmask.trl import PackedGRPOTrainer

    tree_calls = []

    class Spy(PackedGRPOTrainer):
        def _vlm_tree_chunks(self, *args, **kwargs):
            out = super()._vlm_tree_chunks(*args, **kwargs)
            tree_calls.append(out is not None)
            return out

    rows = [dict(prompt=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"w{5 + i} w7"}]}],
                 image=tiny_image(20, 28, i)) for i in range(2)]
    runs = []
    for cls, impl in ((Spy, "packmask"), (GRPOTrainer, "eager")):
        torch.manual_seed(0)
        args = GRPOConfig(output_dir=str(tmp_path / cls.__name__), report_to=[], use_cpu=True, bf16=False,
                          per_device_train_batch_size=4, num_generations=4, max_completion_length=5, max_steps=2,
                          learning_rate=0.1, optim="sgd", logging_steps=1, seed=0, beta=0.0, num_iterations=2,
                          disable_tqdm=True, save_strategy="no",
                          generation_kwargs=dict(bad_words_ids=[[t] for t in range(IMG, IMG + 4)]))  # text answers
        trainer = cls(model=_model("gemma3", impl), args=args, train_dataset=Dataset.from_list(rows),
                      reward_funcs=lambda completions, **kw: [float(len(str(c))) for c in completions],
                      processing_class=tiny_processor("gemma3"))
        trainer.train()
        runs.append((trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]))
    (ours, our_losses), (theirs, their_losses) = runs
    assert len(our_losses) == 2 and our_losses == pytest.approx(their_losses, rel=1e-5, abs=1e-7)
    weights = lambda m: {n: p.detach() for n, p in m.named_parameters()}  # noqa: E731
    assert grad_dict_rel_err(weights(ours.model), weights(theirs.model))[0] < 1e-5  # (floored: k-bias norms ~1e-13)
    assert grad_dict_rel_err(weights(ours.model), weights(_model("gemma3")))[0] > 1e-3  # training moved them
    assert tree_calls and all(tree_calls)
