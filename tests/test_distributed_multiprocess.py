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
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-5


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    src = os.path.join(os.path.dirname(HERE), "src")
    env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _launch(cmd, out, timeout=300):
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not os.path.exists(out):
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def torchrun_results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("torchrun") / "results.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(HERE, "distributed_worker.py"), out]
    return _launch(cmd, out)


@pytest.fixture(scope="module")
def accelerate_results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("accelerate") / "results.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           os.path.join(HERE, "distributed_trainer_worker.py"), out]
    return _launch(cmd, out)


@pytest.mark.parametrize("config", ["ddp-token", "ddp-sequence", "fsdp2-token", "fsdp2-sequence"])
def test_packed_data_parallel_equals_one_big_unpacked_batch(torchrun_results, config):
    r = torchrun_results[config]
    assert r["update_rel_err"] < TOL, r  # the stricter of the two: error relative to what training moved
    assert r["param_rel_err"] < TOL, r
    assert r["update_norm"] > 0.5, r  # training moved the parameters enough for the comparison to mean something


def test_fsdp2_really_sharded_and_ranks_saw_distinct_rows(torchrun_results):
    meta = torchrun_results["_meta"]
    assert meta["world_size"] == 2
    assert meta["fsdp2_sharded"] is True
    assert meta["rows_used"] == meta["distinct_rows_used"] == 2 * 2 * 2 * 3  # ranks x accum x rows x steps


def test_control_local_count_normalisation_is_detected(torchrun_results):
    assert torchrun_results["ddp-token-local-count"]["update_rel_err"] > 1e-2


@pytest.mark.parametrize("config", ["trainer-token", "trainer-sequence", "trainer-native-token"])
def test_hf_trainer_under_accelerate_launch_equals_one_big_unpacked_batch(accelerate_results, config):
    assert accelerate_results["_meta"]["world_size"] == 2
    r = accelerate_results[config]
    assert r["update_rel_err"] < TOL, r
    assert r["param_rel_err"] < TOL, r


def test_train_step_ddp_benchmark_smoke_runs(tmp_path):
    """benchmarks/train_step_ddp.py is meant for a multi-GPU machine; its CPU smoke mode proves it runs."""
    out = str(tmp_path / "smoke.json")
    script = os.path.join(os.path.dirname(HERE), "benchmarks", "train_step_ddp.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script, "--smoke",
           "--out", out]
    record = _launch(cmd, out)
    assert record["failures"] == [] and record["world_size"] == 2
    assert {(r["wrapper"], r["sampler"]) for r in record["results"]} == {
        (w, s) for w in ("ddp", "fsdp2") for s in ("balanced", "round-robin")}
    assert all(r["tokens_per_s_per_gpu"] > 0 for r in record["results"])
