"""scripts/model_support.py gives the vision-language families packmask.multimodal packs a real row (verified
through MultimodalCollator) and counts them; composite families without a rule stay skipped."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("model_support_script", ROOT / "scripts" / "model_support.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vlm_family_rows():
    script = _script()
    assert {"qwen2_5_vl", "paligemma", "smolvlm"} <= set(script._families())  # not causal-LM-mapped: added
    row = script.check_family("paligemma", timeout=300)
    assert row["status"] == "pass" and row["multimodal"], row
    assert max(row["output"], row["loss"], row["grad"]) <= 1e-5
    assert "MultimodalCollator" in row["reason"]
    skipped = script.check_family("gemma3n", timeout=300)  # a composite family without a packing rule
    assert skipped["status"] == "skipped" and "multimodal" in skipped["reason"]
    page = script.render([row, skipped], 1.0)
    assert "**Vision-language families** (`packmask.multimodal`): 1/1 pass" in page
    assert "1 pass, 1 skipped of 2 families" in page
