"""Kernel choice for tree layouts: measured tree / decode rows of the cost table, else dense sdpa for
draft-tree verification (a few queries over a cache) and the first candidate for training trees."""
import torch

from packmask.backends import costs
from packmask.layout_tree import TreeLayout

TABLE = {"decode": {"64": [{"batch": 1, "past": 8192, "ms": {"sdpa": 2.0, "tree_triton": 1.0, "varlen": 3.0}},
                           {"batch": 8, "past": 8192, "ms": {"sdpa": 2.0, "tree_triton": 4.0, "varlen": 0.9}}]},
         "tree": {"64": {"tree_triton": 5.0, "varlen": 6.0}, "128": {"tree_triton": 9.0, "varlen": 7.0}},
         "source": "test"}


def _draft(batch, past=8000):
    return TreeLayout.from_parents(torch.tensor([[-1, 0, 0, 1]] * batch), past_length=past)


def _with_table(monkeypatch, table):
    monkeypatch.setattr(costs, "_device_name", lambda q: "GPU")
    monkeypatch.setattr(costs, "load_table", lambda name: table)


def test_decode_uses_the_nearest_measured_shape(monkeypatch):
    _with_table(monkeypatch, TABLE)
    cands = ["tree_triton", "varlen", "sdpa", "eager"]
    q = torch.zeros(1, 4, 4, 64)
    assert costs.choose_kernel(cands, _draft(1), q)[0] == "tree_triton"
    assert costs.choose_kernel(cands, _draft(6), q)[0] == "varlen"      # nearest measured batch: 8
    assert costs.choose_kernel(["sdpa", "eager"], _draft(1), q)[0] == "sdpa"  # only measured candidates count


def test_training_tree_uses_measured_tree_rows(monkeypatch):
    _with_table(monkeypatch, TABLE)
    train = TreeLayout.from_parents(torch.tensor([[-1, 0, 1, 1]]))
    cands = ["tree_triton", "varlen", "sdpa", "eager"]
    assert costs.choose_kernel(cands, train, torch.zeros(1, 4, 4, 64))[0] == "tree_triton"
    assert costs.choose_kernel(cands, train, torch.zeros(1, 4, 4, 128))[0] == "varlen"


def test_without_a_table_decode_goes_dense(monkeypatch):
    _with_table(monkeypatch, None)
    cands = ["tree_triton", "varlen", "sdpa", "eager"]
    q = torch.zeros(1, 4, 4, 64)
    name, why = costs.choose_kernel(cands, _draft(8), q)
    assert name == "sdpa" and "dense" in why["reason"]
    # control: a training tree (no cache) keeps the dispatcher's first candidate other than tree_triton,
    # which auto takes only once calibrate measured it on this GPU (opt-in until then)
    assert costs.choose_kernel(cands, TreeLayout.from_parents(torch.tensor([[-1, 0]])), q)[0] == "varlen"
    # and a long row over a cache is not a decode call
    assert not costs.is_decode_layout(TreeLayout.from_parents(torch.full((1, 300), -1), past_length=5))


def test_margins_keep_the_default_on_near_ties(monkeypatch):
    """Kernel-only timings undersell launch costs: varlen (training) and sdpa (decode) stay unless beaten
    by TREE_MARGIN / DECODE_MARGIN (the H200 rows of 2026-12-05 are such near ties)."""
    near = {"decode": {"64": [{"batch": 8, "past": 8192, "ms": {"sdpa": 0.285, "tree_triton": 0.201}}]},
            "tree": {"64": {"tree_triton": 1.987, "varlen": 2.002}}, "source": "test"}
    _with_table(monkeypatch, near)
    cands = ["tree_triton", "varlen", "sdpa", "eager"]
    q = torch.zeros(1, 4, 4, 64)
    assert costs.choose_kernel(cands, _draft(8), q)[0] == "sdpa"
    assert costs.choose_kernel(cands, TreeLayout.from_parents(torch.tensor([[-1, 0, 1, 1]])), q)[0] == "varlen"
    # control: a clear win still takes the faster kernel
    near["tree"]["64"]["tree_triton"] = 1.0
    near["decode"]["64"][0]["ms"]["tree_triton"] = 0.1
    assert costs.choose_kernel(cands, TreeLayout.from_parents(torch.tensor([[-1, 0, 1, 1]])), q)[0] == "tree_triton"
    assert costs.choose_kernel(cands, _draft(8), q)[0] == "tree_triton"


def test_a_trees_only_table_leaves_document_layouts_to_the_default(monkeypatch):
    """The shipped H200 table has tree and decode rows but no document buckets (calibrate --trees-only)."""
    from packmask.layout import DocumentLayout
    _with_table(monkeypatch, {k: v for k, v in TABLE.items()})
    monkeypatch.setattr(costs, "_device_name", lambda q: "GPU")
    docs = DocumentLayout.from_seq_lengths([[3, 5]], 8)
    name, why = costs.choose_kernel(["cudnn", "varlen", "flex"], docs, torch.zeros(1, 4, 8, 64))
    assert name == "cudnn" and "no document rows" in why["reason"]
    # control: the shipped H100 table has document rows, so the pricing runs
    import json
    h100 = json.loads(costs._SHIPPED.read_text())["devices"]["NVIDIA H100 80GB HBM3"]
    _with_table(monkeypatch, h100)
    assert "estimated_ms" in costs.choose_kernel(["cudnn", "varlen"], docs, torch.zeros(1, 4, 8, 64))[1]
