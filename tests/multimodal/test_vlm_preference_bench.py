"""benchmarks/vlm_preference.py runs end to end at its tiny size on a CPU: three methods, a JSON report,
the per-answer log-prob and answer-logit checks passed and the logits' control failed."""
import json


def test_vlm_preference_benchmark_tiny(tmp_path, load_benchmark):
    bench = load_benchmark("vlm_preference")  # it imports benchmarks/vlm.py's data builders
    bench.main(["--tiny", "--device", "cpu", "--row", "256", "--rows", "1", "--steps", "2", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "vlm_preference.json").read_text())
    assert not report["failures"]
    results = report["results"]
    assert {"tree", "dup_packed", "padded_sdpa"} <= set(results)
    assert results["tree"]["logp_sums_rel_err_vs_alone"] <= 1e-4
    assert results["tree"]["slots"] < results["dup_packed"]["slots"]  # prompts and images stored once
    assert results["tree"]["logits_rel_err_vs_alone"] <= 1e-4
    assert results["control_siblings_rel_err"] > 1e-2  # answer logits of a tree whose answers see their siblings
    assert report["env"]["script"] == "benchmarks/vlm_preference.py"


def test_vlm_grpo_benchmark_tiny(tmp_path, load_benchmark):
    """--group G: GRPO groups as trees (the prompt and its images once for G completions), same checks."""
    bench = load_benchmark("vlm_preference")
    bench.main(["--tiny", "--device", "cpu", "--group", "3", "--row", "256", "--rows", "1", "--steps", "2",
                "--out", str(tmp_path)])
    report = json.loads((tmp_path / "vlm_grpo.json").read_text())
    assert not report["failures"] and report["env"]["workload"] == "grpo G=3"
    results = report["results"]
    assert results["tree"]["logp_sums_rel_err_vs_alone"] <= 1e-4
    assert results["tree"]["slots"] < results["dup_packed"]["slots"]
    assert results["control_siblings_rel_err"] > 1e-4
