"""Each sample of a packed vision-language row gives what it gives alone: logits of every token, the
loss and every parameter gradient (vision tower included), fp32 CPU, rel. err <= 1e-5 -- for every
family with a packing rule. Control: the same samples concatenated and run as one sequence differ."""
import pytest
import torch

import packmask

from packmask.multimodal.tiny import VLM_FAMILIES, tiny_sample, tiny_vlm
from packmask.multimodal.verify import compare_packed, random_samples

TOL = 1e-5
VISION_PREFIXES = ("model.visual.", "model.vision_tower.", "model.vision_model.", "model.multi_modal_projector.")


@pytest.fixture(scope="module")
def models():
    return {}


def _model(models, family):
    if family not in models:
        models[family] = tiny_vlm(family)
    return models[family]


def _check(result):
    assert result["logits"] <= TOL, result
    assert result["loss"] <= TOL, result
    assert result["grad"] <= TOL, result


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_packed_row_equals_each_sample_alone(models, family):
    model = _model(models, family)
    samples = random_samples(model, 4)
    result = compare_packed(model, samples, control=True)
    _check(result)
    assert result["control"] > 1e-2, result  # run as one sequence, the samples see each other
    # the vision tower's parameters are among those compared (every parameter with a gradient alone)
    names = {n for n, p in model.named_parameters()}
    assert any(n.startswith(VISION_PREFIXES) or ".vision" in n for n in names)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_verify_passes(models, family):
    """``packmask.verify`` on the tiny model ``model_for(family)`` builds: one row and two padded rows."""
    from packmask.families import model_for

    model = models.setdefault(family, model_for(family))
    report = packmask.verify(model, print_table=False)
    assert report.passed, report.summary()
    assert [row.form for row in report.rows] == ["collator", "collator, 2 rows"]


def test_verify_cli(capsys, monkeypatch):
    """``packmask verify --model qwen2_5_vl`` exits 0 with a PASS line (in-process: no interpreter start-up)."""
    from packmask.cli.main import main

    monkeypatch.setenv("COLUMNS", "120")
    assert main(["verify", "--model", "qwen2_5_vl"]) == 0
    assert "PASS qwen2_5_vl" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3", "idefics3", "llava_next", "mistral3"])
def test_two_padded_rows(models, family):
    """max_length splits the samples over two rows: the shorter row is padded; image tensors of
    different sizes / tile counts are padded (Mistral3, LLaVA-NeXT) or rows padded with blank images
    (Idefics3: the second row holds no image at all)."""
    model = _model(models, family)
    g = torch.Generator().manual_seed(3)
    samples = [tiny_sample(model, 5, 2, g), tiny_sample(model, 4, 1, g), tiny_sample(model, 7, 0, g)]
    lengths = [s["input_ids"].shape[1] for s in samples]
    max_length = max(lengths[0] + lengths[1], lengths[2])  # row 0: samples 0, 1; row 1: sample 2 (text only)
    if lengths[0] + lengths[1] + lengths[2] <= max_length:
        max_length = lengths[0] + lengths[1]
    _check(compare_packed(model, samples, max_length=max_length))


def test_three_mrope_rows_with_a_mask(models, monkeypatch):
    """A language model that reads no text row gets [3, B, L] positions and a block mask: exact too."""
    from packmask.multimodal import MultimodalCollator, collator

    monkeypatch.setattr(collator, "takes_text_row", lambda model: False)
    model = _model(models, "qwen2_5_vl")
    samples = random_samples(model, 3, seed=1)
    batch = MultimodalCollator(model)(samples)
    assert batch["position_ids"].shape[0] == 3 and batch["attention_mask"].dim() == 3
    _check(compare_packed(model, samples))


def test_paligemma_unpacked_on_packmask_equals_eager(models):
    """Regression: PaliGemma hands its prepared mask to GemmaModel, which builds masks again; packmask's
    mask object passes through (it crashed with AttributeError: ndim)."""
    model = _model(models, "paligemma")
    sample = random_samples(model, 1)[0]
    with torch.no_grad():
        got = model(**sample, use_cache=False).logits
        model.set_attn_implementation("eager")
        try:
            ref = model(**sample, use_cache=False).logits
        finally:
            model.set_attn_implementation("packmask")
    assert ((got - ref).norm() / ref.norm()).item() <= TOL


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_videos_and_images_mixed(models, family):
    """Qwen samples with videos (pixel_values_videos, video_grid_thw; second_per_grid_ts for 2.5) beside
    images and text-only samples."""
    model = _model(models, family)
    g = torch.Generator().manual_seed(5)
    samples = [tiny_sample(model, 4, 1, g, n_videos=1), tiny_sample(model, 5, 0, g),
               tiny_sample(model, 3, 0, g, n_videos=1), tiny_sample(model, 6, 2, g)]
    result = compare_packed(model, samples, control=True)
    _check(result)
    assert result["control"] > 1e-2


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_exact_with_activation_checkpointing_in_training_mode(family):
    """Recomputed layers (checkpointing, train mode) see the same per-sample layout in backward."""
    model = tiny_vlm(family)
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    _check(compare_packed(model, random_samples(model, 4), training=True))
