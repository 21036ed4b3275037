"""benchmarks/hybrid.py and benchmarks/hybrid_tree.py run end to end at their tiny sizes on a CPU (both models):
every method's check passes, the contaminated / plain-causal control fails it, and the JSON says what ran."""
import json


def test_hybrid_benchmark_tiny(tmp_path, load_benchmark):
    load_benchmark("hybrid").main(["--tiny", "--steps", "1", "--out", str(tmp_path)])  # exits 1 on a failed check
    report = json.loads((tmp_path / "hybrid.json").read_text())
    assert report["script"] == "benchmarks/hybrid.py" and report["tiny"]
    for record in report["records"]:
        by = {r["method"]: r for r in record["results"]}
        assert by["packmask"]["row0_rel_err"] <= 1e-4 and by["packmask_strict"]["row0_rel_err"] <= 1e-4
        assert by["contaminated"]["row0_rel_err"] > 1e-2, record["model"]  # the control: documents see each other
        assert "skipped" in by["packmask_varlen"] or "tokens_per_s" in by["packmask_varlen"]
        assert 1 <= by["packmask"]["mixer_calls"] <= by["packmask_strict"]["mixer_calls"] == sum(record["docs_per_row"])


def test_hybrid_tree_benchmark_tiny(tmp_path, load_benchmark):
    load_benchmark("hybrid_tree").main(["--tiny", "--steps", "1", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "hybrid_tree.json").read_text())
    assert report["script"] == "benchmarks/hybrid_tree.py" and report["tiny"]
    for record in report["records"]:
        by = {r["method"]: r for r in record["results"]}
        assert by["tree"]["loss_rel_err"] <= 1e-5 and by["tree"]["logits_rel_err"] <= 1e-5, record["model"]
        assert by["control_plain_causal"]["logits_rel_err"] > 1e-2  # answers that see each other differ
