"""benchmarks/vlm.py runs end to end at its tiny size on a CPU: three methods, a JSON report, checks passed."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_vlm_benchmark_tiny(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vlm.py"), "--tiny", "--device", "cpu", "--row",
                             "256", "--rows", "1", "--steps", "2", "--out", str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "vlm.json").read_text())
    assert not report["failures"]
    results = report["results"]
    assert {"packmask", "padded_sdpa", "flatten_sdpa"} <= set(results)
    assert results["packmask"]["logits_rel_err_vs_alone"] <= 1e-4
    assert results["control_one_sequence_rel_err"] > 1e-2
    assert report["env"]["script"] == "benchmarks/vlm.py" and report["env"]["transformers"]
