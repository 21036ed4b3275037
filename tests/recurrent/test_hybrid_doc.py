"""docs/hybrid.md's worked example runs as printed (a Qwen3.5-shaped model trained on packed rows with
the HF Trainer equals the same model trained unpacked), and its control: without the per-sequence path
the packed run is refused, and forced through it trains a different model."""
import pathlib
import re

import pytest

import packmask
from packmask import support

PAGE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "hybrid.md"


def _example() -> str:
    found = re.search(r"<!-- hybrid-example -->\n```python\n(.*?)```", PAGE.read_text(), re.S)
    assert found, "docs/hybrid.md lost its worked example"
    return found.group(1)


def test_worked_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope = {"__name__": "hybrid_example"}
    exec(compile(_example(), str(PAGE), "exec"), scope)  # asserts inside: losses and weights agree to 1e-5
    assert scope["worst"] < 1e-5

    # control: the packed rows with the gated delta nets on their own forwards (no reset between documents)
    original_train = scope["train"]

    def train_without_reset(dataset, collator, batch_size):
        AutoModel = scope["AutoModelForCausalLM"]
        build = AutoModel.from_config

        def build_without(config, **kwargs):
            model = build(config, **kwargs)
            packmask.recurrent.install(model)
            packmask.recurrent.uninstall(model)  # and stays off
            return model
        monkeypatch.setattr(AutoModel, "from_config", build_without)
        try:
            return original_train(dataset, collator, batch_size)
        finally:
            monkeypatch.setattr(AutoModel, "from_config", build)

    with pytest.raises(packmask.UnsupportedModelError, match="state-space / recurrent"):
        train_without_reset(scope["packed"], packmask.PackedCollator(pad_token_id=0), 2)
    monkeypatch.setattr(support, "_runs_per_sequence", lambda model: True)  # forced through
    collate = packmask.PackedCollator(pad_token_id=0)

    def positions_only(features):  # transformers refuses cu_seq_lens without fla on CPU; positions mix silently
        return {k: v for k, v in collate(features).items() if not k.startswith(("cu_seq_lens", "max_length"))}
    model, losses = train_without_reset(scope["packed"], positions_only, 2)
    assert max(abs(a - b) / b for a, b in zip(losses, scope["plain_losses"])) > 1e-5
    weights = dict(scope["plain_model"].named_parameters())
    worst = max(scope["rel_err"](p.detach(), weights[n].detach()) for n, p in model.named_parameters())
    assert worst > 1e-3
