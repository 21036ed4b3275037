"""PackedGRPOTrainer's text path against trl.GRPOTrainer with completions masked out whole
(``mask_truncated_completions``) and with ``cast_lm_head_to_fp32`` (CPU, fp32, tiny random Llama)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

import packmask  # noqa: E402,F401  (registers the "packmask" attention)
from packmask.testing import grad_rel_err, rel_err, tiny_model  # noqa: E402

from _trl_data import VOCAB, counting_tree_calls, tiny_tokenizer  # noqa: E402  (tests/_trl_data.py)

K = 7   # completion block (logits_to_keep)


def _trainer(cls, tmp_path, **config):
    from datasets import Dataset
    from trl import GRPOConfig

    args = GRPOConfig(output_dir=str(tmp_path / cls.__name__), report_to=[], use_cpu=True, per_device_train_batch_size=8,
                      num_generations=4, max_completion_length=K, temperature=0.7, beta=0.0,
                      mask_truncated_completions=True, **{"bf16": False, **config})
    return cls(model=tiny_model("llama", attn_implementation="packmask"),
               reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
               train_dataset=Dataset.from_dict({"prompt": ["t5 t6", "t7"]}), processing_class=tiny_tokenizer())


def _batch(masked_out=(0, 5)):
    """Two prompts (left-padded to 5) x 4 completions (right-padded to K) as TRL lays them out; the rows
    ``masked_out`` keep their tokens but have an all-zero completion mask (a truncated completion)."""
    g = torch.Generator().manual_seed(0)
    prompts = [[0, 0, 5, 6, 7], [0, 9, 10, 11, 12]]
    ids, p_mask, c_mask = [], [], []
    for p in prompts:
        for _ in range(4):
            n = int(torch.randint(1, K + 1, (1,), generator=g))
            ids.append(p + torch.randint(3, VOCAB, (n,), generator=g).tolist() + [0] * (K - n))
            p_mask.append([int(t != 0) for t in p])
            c_mask.append([1] * n + [0] * (K - n))
    ids, p_mask, c_mask = torch.tensor(ids), torch.tensor(p_mask), torch.tensor(c_mask)
    c_mask[list(masked_out)] = 0
    return ids, p_mask, c_mask


def _loss_inputs(ids, p_mask, c_mask, old_logps):
    g = torch.Generator().manual_seed(1)
    return dict(prompt_ids=ids[:, :-K], prompt_mask=p_mask, completion_ids=ids[:, -K:], completion_mask=c_mask,
                advantages=torch.randn(ids.shape[0], generator=g), num_items_in_batch=c_mask.sum(),
                old_per_token_logps=old_logps + 0.1 * torch.randn(old_logps.shape, generator=g))  # some ratios clip


def test_fully_masked_completion_stays_on_trees(tmp_path):
    from trl import GRPOTrainer

    from packmask.trl import PackedGRPOTrainer

    packed, plain = _trainer(counting_tree_calls(PackedGRPOTrainer), tmp_path), _trainer(GRPOTrainer, tmp_path)
    ids, p_mask, c_mask = _batch()
    mask = torch.cat([p_mask, c_mask], 1)
    lp, ent, _ = packed._get_per_token_logps_and_entropies(packed.model, ids, mask, K, compute_entropy=True)
    assert type(packed).tree_calls == 1   # one chunk, on trees: the whole-chunk fallback is gone
    with torch.no_grad():
        ref_lp, ref_ent, _ = plain._get_per_token_logps_and_entropies(plain.model, ids, mask, K, compute_entropy=True)
    valid = c_mask.bool()
    assert rel_err(lp[valid], ref_lp[valid]) < 1e-5 and rel_err(ent[valid], ref_ent[valid]) < 1e-5
    assert (ref_lp[~valid] == 0).all() and (ref_ent[~valid] == 0).all()   # TRL's values for masked positions
    assert torch.equal(lp[~valid], ref_lp[~valid]) and torch.equal(ent[~valid], ref_ent[~valid])

    # the GRPO loss and every parameter gradient
    inputs = _loss_inputs(ids, p_mask, c_mask, ref_lp)
    loss, ref_loss = packed.compute_loss(packed.model, inputs), plain.compute_loss(plain.model, inputs)
    loss.backward()
    ref_loss.backward()
    assert rel_err(loss.detach(), ref_loss.detach()) < 1e-5
    assert grad_rel_err(packed.model, plain.model)[0] < 1e-5
    assert type(packed).tree_calls == 2

    # control: the masked completions are really in the batch -- scored as branches they change the gradient
    plain.model.zero_grad()
    unmasked = _batch(masked_out=())[2]
    plain.compute_loss(plain.model, dict(inputs, completion_mask=unmasked, num_items_in_batch=unmasked.sum())).backward()
    assert grad_rel_err(packed.model, plain.model)[0] > 1e-2


def test_all_completions_masked_stays_differentiable(tmp_path):
    """Nothing to score: TRL's zeros, still connected to the model (backward() works, zero gradient)."""
    from packmask.trl import PackedGRPOTrainer

    packed = _trainer(PackedGRPOTrainer, tmp_path)
    ids, p_mask, c_mask = _batch(masked_out=range(8))
    lp, _, _ = packed._get_per_token_logps_and_entropies(packed.model, ids, torch.cat([p_mask, c_mask], 1), K)
    assert (lp == 0).all()
    lp.sum().backward()


def test_fp32_lm_head_honoured(tmp_path):
    from trl import GRPOTrainer

    from packmask.trl import PackedGRPOTrainer

    ids, p_mask, c_mask = _batch()
    mask, valid = torch.cat([p_mask, c_mask], 1), c_mask.bool()
    # fp32: equal to TRL's fused fp32 head, on trees
    packed = _trainer(counting_tree_calls(PackedGRPOTrainer), tmp_path, cast_lm_head_to_fp32=True)
    plain = _trainer(GRPOTrainer, tmp_path, cast_lm_head_to_fp32=True)
    with torch.no_grad():
        lp = packed._get_per_token_logps_and_entropies(packed.model, ids, mask, K)[0]
        ref_lp = plain._get_per_token_logps_and_entropies(plain.model, ids, mask, K)[0]
    assert type(packed).tree_calls == 1 and rel_err(lp[valid], ref_lp[valid]) < 1e-5

    # bf16 autocast (bf16=True): the head runs in fp32 with the flag, in bf16 without it (the control)
    head_dtypes = {}
    for flag in (True, False):
        trainer = _trainer(PackedGRPOTrainer, tmp_path, bf16=True, cast_lm_head_to_fp32=flag)
        seen = []
        trainer.model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        with torch.no_grad():
            trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, K)
        head_dtypes[flag] = set(seen)
        assert not torch.is_autocast_enabled("cpu")   # the head's autocast switch did not leak
    assert head_dtypes == {True: {torch.float32}, False: {torch.bfloat16}}
