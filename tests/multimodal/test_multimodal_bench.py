"""benchmarks/vlm.py runs end to end at its tiny size on a CPU: three methods, a JSON report, checks passed."""
import json


def test_vlm_benchmark_tiny(tmp_path, load_benchmark):
    bench = load_benchmark("vlm")
    bench.main(["--tiny", "--device", "cpu", "--row", "256", "--rows", "1", "--steps", "2", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "vlm.json").read_text())
    assert not report["failures"]
    results = report["results"]
    assert {"packmask", "padded_sdpa", "flatten_sdpa"} <= set(results)
    assert results["packmask"]["logits_rel_err_vs_alone"] <= 1e-4
    assert results["control_one_sequence_rel_err"] > 1e-2
    assert report["env"]["script"] == "benchmarks/vlm.py" and report["env"]["transformers"]
