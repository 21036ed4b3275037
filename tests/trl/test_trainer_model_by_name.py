"""``PackedDPOTrainer(model="path")`` / ``PackedGRPOTrainer(model="path")`` load the model (and the DPO
reference) with ``attn_implementation="packmask"`` themselves (issue 21, item 7)."""
from __future__ import annotations

import pytest

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402

from packmask.errors import PackmaskError  # noqa: E402
from packmask.testing import tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", attn_implementation="eager").save_pretrained(folder)  # saved without packmask
    return str(folder)


def _dpo_args(tmp_path, **extra):
    from trl import DPOConfig

    return DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=0.1,
                     optim="sgd", logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", bf16=False,
                     loss_type=["sigmoid"], beta=0.5, seed=0, max_length=14, dataloader_num_workers=0,
                     disable_tqdm=True, **extra)


def test_packed_dpo_loads_a_model_path_with_packmask(model_folder, tmp_path):
    from _trl_data import preference_data, tiny_tokenizer
    from trl import DPOTrainer

    from packmask.trl import PackedDPOTrainer

    data = Dataset.from_list(preference_data())
    by_name = PackedDPOTrainer(model=model_folder, args=_dpo_args(tmp_path / "a"), train_dataset=data,
                               processing_class=tiny_tokenizer())
    assert by_name.model.config._attn_implementation == "packmask"
    assert by_name.ref_model.config._attn_implementation == "packmask"
    by_name.train()
    # reference: the same weights loaded by hand with packmask, as the recipe says
    by_hand = PackedDPOTrainer(model=tiny_model("llama"), ref_model=tiny_model("llama"), args=_dpo_args(tmp_path / "b"),
                               train_dataset=data, processing_class=tiny_tokenizer())
    by_hand.train()
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (by_name, by_hand)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and len(losses[0]) == 1
    # control: TRL alone loads the path with its default attention, which packed rows cannot use
    plain = DPOTrainer(model=model_folder, args=_dpo_args(tmp_path / "c"), train_dataset=data,
                       processing_class=tiny_tokenizer())
    assert plain.model.config._attn_implementation != "packmask"


def test_conflicting_model_init_kwargs_are_refused_with_the_fix(model_folder, tmp_path):
    from _trl_data import preference_data, tiny_tokenizer

    from packmask.trl import PackedDPOTrainer

    with pytest.raises(PackmaskError, match="attn_implementation='eager'.*leave attn_implementation out"):
        PackedDPOTrainer(model=model_folder, args=_dpo_args(tmp_path, model_init_kwargs={"attn_implementation": "eager"}),
                         train_dataset=Dataset.from_list(preference_data(2)), processing_class=tiny_tokenizer())


def test_packed_grpo_loads_a_model_path_with_packmask(model_folder, tmp_path):
    from _trl_data import tiny_tokenizer
    from trl import GRPOConfig

    from packmask.trl import PackedGRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=8)
    trainer = PackedGRPOTrainer(model_folder, lambda completions, **kw: [0.0] * len(completions), args=args,
                                train_dataset=Dataset.from_dict({"prompt": ["t5 t6", "t7"]}),
                                processing_class=tiny_tokenizer())
    assert trainer.model.config._attn_implementation == "packmask"
