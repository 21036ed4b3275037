"""The one-launch tree kernel (packmask.backends.tree_triton) on CPU, under Triton's interpreter.

triton is not a CI dependency: skipped without it. The interpreter must be on before triton compiles
anything, so the checks run in a fresh process (tree_triton_worker.py) that reports relative errors of
the forward and of the q/k/v gradients against eager math with the dense tree mask, in fp32 (fp16 for
one case; the interpreter mis-loads bf16, so bf16 is checked on GPU: test_tree_triton_cuda.py).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from packmask.backends import AttentionSpec, choose_backend, describe_choice
from packmask.backends.tree_triton import refusal, tree_kernel_inputs, tree_ranks
from packmask.layout_tree import TreeLayout

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def report():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    src = str(Path(__import__("packmask").__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(HERE / "tree_triton_worker.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["train_fp32", "train_softcap_window", "draft_fp32", "draft_window_cropped",
                                  "draft_split_kv"])
def test_kernel_matches_dense_math_fp32(report, case):
    assert max(report[case]) <= 1e-5, report[case]


def test_kernel_fp16_and_control(report):
    assert max(report["draft_mha_fp16"]) <= 2e-3
    # control: the kernel given a different tree (a branch re-hung) is far from this tree's math
    assert min(report["train_control"]) > 1e-2


def test_model_on_tree_kernel_matches_sdpa(report):
    logits_err, grad_err = report["model_llama"]
    assert logits_err <= 1e-5 and grad_err <= 1e-5


def test_ranks_are_preorder():
    # breadth-first draft tree a b | c d (children of a) | e (child of b): preorder a c d b e
    rank, end = tree_ranks(TreeLayout.from_parents(torch.tensor([[-1, -1, 0, 0, 1]])))
    assert rank.tolist() == [[0, 3, 1, 2, 4]] and end.tolist() == [[3, 5, 2, 3, 5]]


def test_tiles_cover_every_visible_pair():
    g = torch.Generator().manual_seed(3)
    parents = torch.tensor([[-1] + [int(torch.randint(-1, i, (1,), generator=g)) for i in range(1, 70)]])
    layout = TreeLayout.from_parents(parents, 9)
    a = tree_kernel_inputs(layout, block_m=16, block_n=16)
    vis = (a.klo[:, None, :] <= a.qrank[:, :, None]) & (a.qrank[:, :, None] < a.khi[:, None, :])
    assert torch.equal(vis, layout.dense_mask()[:, 0])  # the rank test is the tree mask
    tiles = torch.zeros(1, 5, 5, dtype=torch.bool)
    for qb in range(5):
        for i in range(int(a.q_count[0, qb])):
            tiles[0, qb, a.q_index[0, qb, i]] = True
    pad = torch.nn.functional.pad(vis, (0, 80 - 79, 0, 80 - 70))
    needed = pad.view(1, 5, 16, 5, 16).any(4).any(2)
    assert bool((needed <= tiles).all())  # every tile with a visible pair is visited
    # a depth-first training row (prompt, two branches, another example) skips the tiles it never sees
    from packmask.layout_tree import analyse_tree_mask
    from packmask.masks import tree_mask_from_segments
    mask, _ = tree_mask_from_segments([[(0, 20, -1), (20, 20, 0), (40, 20, 0), (60, 20, -1)]], 80)
    b = tree_kernel_inputs(analyse_tree_mask(mask), block_m=16, block_n=16)
    assert b.q_count.tolist() == [[1, 2, 3, 4, 2]]  # block 4 (tokens 64-79, the second example) sees 3, 4 only


def test_refusals_and_dispatch():
    layout = TreeLayout.from_parents(torch.tensor([[-1, 0, 0]]))
    q = torch.zeros(1, 2, 3, 8)
    spec = AttentionSpec(scale=1.0)
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert "CUDA" in refusal(layout, spec, q, True)
        assert choose_backend(layout, spec, q, training=True) == "sdpa"
    assert "dropout" in refusal(layout, AttentionSpec(1.0, dropout=0.1), q, True)
    assert "sink" in refusal(layout, AttentionSpec(1.0, sinks=torch.zeros(2)), q, True)
    assert "tree layouts only" in refusal(None, spec, q, True)
    assert "tree_triton" in describe_choice(layout, spec, q)["refused"]


def test_compiled_kernel_reuses_the_graph_across_trees(report):
    # aot_eager, fullgraph, error_on_recompile after the first tree: a second tree of the same shape
    # compiled nothing new (the worker raised otherwise) and both match eager math
    assert len(report["compiled"]) == 2 and max(report["compiled"]) <= 1e-5


def test_compiled_model_on_tree_rows_reuses_the_graph(report):
    # torch.compile(model): three trees of one shape, one compilation (error_on_recompile after the first),
    # graph breaks only at the forward pre-hook, logits and parameter gradients equal eager sdpa
    *errs, control, other_breaks = report["compiled_model"]
    assert len(errs) == 3 and max(errs) <= 1e-5
    assert other_breaks == 0
    assert control > 1e-2  # control: the same rows without the tree mask differ
