"""Exactness across processes: 2 CPU ranks (gloo) x 2 accumulated micro-batches x 3 optimizer steps of
packed training equal one process running the same documents unpacked in one big batch.

Two launches, each running several configurations in one process group (``distributed_worker.py``
under ``torchrun``: DDP and FSDP2, per-token and per-sequence loss, a wrong-normalisation control;
``distributed_trainer_worker.py`` under ``accelerate launch``: the HF Trainer). Rendezvous on a
free port (``--standalone``; a fresh free port for accelerate), so ``pytest -n 2`` runs cannot collide.
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.multiprocess

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = next(str(p) for p in pathlib.Path(HERE).parents if (p / "pyproject.toml").is_file())  # the repository
TOL = 1e-5


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    src = os.path.join(ROOT, "src")
    env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _launch(cmd, out, timeout=300):
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not os.path.exists(out):
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    with open(out) as f:
        return json.load(f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(results, configs, failures):
    for config in configs:
        r = results[config]
        # update_rel_err is the stricter: the error relative to how far training moved the parameters
        if not (r["update_rel_err"] < TOL and r["param_rel_err"] < TOL):
            failures.append(f"{config}: {r}")


# One test per launch (not one per configuration): under pytest-xdist a module fixture shared by tests
# on two workers would launch the processes twice.
def test_torchrun_ddp_and_fsdp2_packed_equal_one_big_unpacked_batch(tmp_path):
    out = str(tmp_path / "results.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(HERE, "distributed_worker.py"), out]
    results = _launch(cmd, out)
    failures = []
    _check(results, ["ddp-token", "ddp-sequence", "fsdp2-token", "fsdp2-sequence"], failures)
    if not all(results[c]["update_norm"] > 0.5 for c in ("ddp-token", "ddp-sequence")):
        failures.append("training barely moved the parameters: the comparison would mean little")
    # control: dividing each micro-batch by its own count (per-batch mean / accumulation) is caught
    if not results["ddp-token-local-count"]["update_rel_err"] > 1e-2:
        failures.append(f"control not detected: {results['ddp-token-local-count']}")
    meta = results["_meta"]
    if not (meta["world_size"] == 2 and meta["fsdp2_sharded"] is True and meta["reduce_across_matches"] is True):
        failures.append(f"meta: {meta}")
    if not meta["rows_used"] == meta["distinct_rows_used"] == 2 * 2 * 2 * 3:  # ranks x accum x rows x steps
        failures.append(f"ranks did not see distinct rows: {meta}")
    assert not failures, "\n".join(failures)


def test_accelerate_launch_hf_trainer_packed_equals_one_big_unpacked_batch(tmp_path):
    out = str(tmp_path / "results.json")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), os.path.join(HERE, "distributed_trainer_worker.py"), out]
    results = _launch(cmd, out)
    assert results["_meta"]["world_size"] == 2
    failures = []
    _check(results, ["trainer-token", "trainer-sequence", "trainer-native-token"], failures)
    assert not failures, "\n".join(failures)


def test_train_step_ddp_benchmark_smoke_runs(tmp_path):
    """benchmarks/train_step_ddp.py is meant for a multi-GPU machine; its CPU smoke mode proves it runs."""
    out = str(tmp_path / "smoke.json")
    script = os.path.join(ROOT, "benchmarks", "train_step_ddp.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script, "--smoke",
           "--out", out]
    record = _launch(cmd, out)
    assert record["failures"] == [] and record["world_size"] == 2
    assert {(r["wrapper"], r["sampler"]) for r in record["results"]} == {
        (w, s) for w in ("ddp", "fsdp2") for s in ("balanced", "round-robin")}
    assert all(r["tokens_per_s_per_gpu"] > 0 for r in record["results"])
