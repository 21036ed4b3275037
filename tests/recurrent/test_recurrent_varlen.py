"""The varlen recurrent path (packmask.recurrent.varlen) and its dispatcher.

The kernel comparisons run flash-linear-attention's Triton kernels under Triton's CPU interpreter in a
fresh process (varlen_worker.py; skipped without fla-core / triton): a tiny Qwen3.5 and a tiny
Nemotron-H on two packed rows,
the varlen path (one mixer call per row, ``cu_seqlens``) against the generic per-sequence path and
each document alone, with a control (the kernels given only the row boundaries differ).
The dispatcher tests need no kernels.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import packmask
from packmask.recurrent import configure, describe_paths
from packmask.recurrent.kernels import EXTRAS, kernel_hooks_available
from packmask.recurrent.varlen import MixerForward, choose_path, kernel_plan, varlen_refusal
from packmask.testing import tiny_model

HERE = Path(__file__).parent
HAVE_FLA = all(importlib.util.find_spec(m) is not None for m in ("fla", "triton"))


@pytest.fixture
def settings():
    previous = configure()
    yield
    configure(**previous)


@pytest.fixture(scope="module")
def report():
    if not HAVE_FLA:
        pytest.skip("flash-linear-attention (fla-core) and triton are not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    src = str(Path(packmask.__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(HERE / "varlen_worker.py"), *FAMILIES], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


#: gated delta net + short convolution (fla chunk_gated_delta_rule, causal_conv1d); Mamba2 (fla
#: chunk_simple_gla, causal_conv1d)
FAMILIES = ("qwen3_5_text", "nemotron_h")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("reference", ["generic", "alone"])
def test_varlen_matches_reference_fp32(report, family, reference):
    r = report[family][reference]
    assert r["count"] > 10
    assert r["logits"] <= 1e-5 and r["loss"] <= 1e-5 and r["grads"] <= 1e-5, r
    assert r["decay_grads"] <= 1e-4, r  # fla's fp32 rounding of the decay gradients (see varlen_worker.DECAY)


@pytest.mark.parametrize("family", FAMILIES)
def test_varlen_control_row_boundaries_only(report, family):
    assert report[family]["control"] > 1e-2, report[family]


# ---- dispatcher (no kernels needed) ---------------------------------------------------------------

def test_cpu_takes_generic_path_and_says_why(settings):
    model = tiny_model("qwen3_5_text")
    info = describe_paths(model, device="cpu")
    assert info["model.layers.0.linear_attn"]["path"] == "generic"
    assert "CUDA" in info["model.layers.0.linear_attn"]["why"] or "fla" in info["model.layers.0.linear_attn"]["why"]


def test_kernels_absent_falls_back_and_forced_varlen_names_the_extra(settings, monkeypatch):
    import packmask.recurrent.varlen as varlen

    monkeypatch.setattr(varlen, "kernels_available", lambda package: False)
    mixer = tiny_model("qwen3_5_text").model.layers[0].linear_attn
    plan, why = kernel_plan(mixer)
    assert plan is None and "packmask[fla]" in why
    hidden = torch.zeros(1, 4, 8)
    configure(cpu_kernels=True)
    assert choose_path((plan, why), hidden) == "generic"
    configure(path="varlen")
    with pytest.raises(packmask.PackmaskError, match=r"packmask\[fla\]"):
        choose_path((plan, why), hidden, "layer x")


def test_forced_varlen_on_cpu_refuses_with_reason(settings):
    configure(path="varlen")
    model = tiny_model("qwen3_5_text")
    ids = torch.randint(3, 100, (1, 9))
    with pytest.raises(packmask.PackmaskError, match="varlen"):
        model(input_ids=ids, seq_lengths=[[4, 5]])


def test_generic_forced_and_dtype_refusal(settings):
    plan_and_why = ({"chunk_gated_delta_rule": ("fla", object)}, None)
    configure(cpu_kernels=True)
    assert varlen_refusal(plan_and_why, torch.zeros(2, dtype=torch.float32)) is None
    assert "float64" in varlen_refusal(plan_and_why, torch.zeros(2, dtype=torch.float64))
    configure(path="generic")
    assert choose_path(plan_and_why, torch.zeros(2)) == "generic"


def test_layers_without_hooks_or_with_unknown_kernels_are_refused():
    plan, why = kernel_plan(torch.nn.Linear(2, 2))
    assert plan is None and "kernel functions" in why
    mixer = tiny_model("mamba").backbone.layers[0].mixer
    plan, why = kernel_plan(mixer)
    # what the installed transformers gives: per-instance kernel functions (5.25: mamba_inner_fn has no
    # varlen version) or none at all (5.17's shared `kernels` 0.16 wrappers)
    expected = "no varlen version" if kernel_hooks_available(mixer) else "no per-instance kernel functions"
    assert plan is None and expected in why


def test_installed_mixers_dispatch():
    model = tiny_model("qwen3_5_text")
    packmask.recurrent.install(model)
    assert isinstance(model.model.layers[0].linear_attn.forward, MixerForward)
    assert EXTRAS["fla"].startswith("pip install")


def test_configure_rejects_bad_values():
    with pytest.raises(packmask.PackmaskError):
        configure(path="fast")
    with pytest.raises(packmask.PackmaskError):
        configure(cpu_kernels="yes")


def test_shared_kernel_wrappers_are_no_per_instance_hook():
    # kernels 0.16 (transformers 5.17) lists the module-level wrapper itself: swapping it would be global
    import sys

    mixer = tiny_model("qwen3_5_text").model.layers[0].linear_attn
    if not kernel_hooks_available(mixer):
        pytest.skip("this transformers gives Qwen3.5's layer no per-instance kernel functions (kernels < 0.19.1)")
    shared = vars(sys.modules[type(mixer).__module__])
    funcs = mixer.__dict__["_kernel_funcs"]
    saved = dict(funcs)
    try:
        funcs["chunk_gated_delta_rule"] = shared["torch_chunk_gated_delta_rule"]
        assert not kernel_hooks_available(mixer)
    finally:
        funcs.update(saved)


def test_tree_rows_never_take_the_varlen_path(settings, monkeypatch):
    """A shared-prefix tree's branches start from the prompt's state, which cu_seqlens / seq_idx cannot
    express: even where the dispatcher would pick the kernels, tree rows run the per-path generic route
    (exact: tests/recurrent/test_recurrent_trees.py). Control: a document row does reach the kernels."""
    import packmask.recurrent.varlen as varlen

    reached = []
    monkeypatch.setattr(varlen, "choose_path", lambda *a, **k: "varlen")
    monkeypatch.setattr(MixerForward, "_varlen", lambda self, layout, args, kwargs: reached.append(layout) or
                        self._per_sequence(layout, args, kwargs))
    model = tiny_model("qwen3_5_text")
    ids = torch.randint(3, 100, (1, 9))
    mask, pos = packmask.tree_mask_from_segments([[(0, 3, -1), (3, 2, 0), (5, 4, 0)]], 9)
    tree = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    assert reached == []
    model(input_ids=ids, seq_lengths=[[4, 5]], use_cache=False)  # control: documents reach the kernel path
    assert len(reached) > 0
    configure(path="generic")
    assert torch.equal(tree, model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits)


def test_forced_varlen_refuses_tree_rows(settings):
    """``configure(path="varlen")`` is a promise that the kernels run: a tree row (which they cannot
    express) raises instead of quietly taking the per-path route. Control: path="auto" runs it."""
    model = tiny_model("qwen3_5_text")
    ids = torch.randint(3, 100, (1, 9))
    mask, pos = packmask.tree_mask_from_segments([[(0, 3, -1), (3, 2, 0), (5, 4, 0)]], 9)
    configure(path="varlen")
    with pytest.raises(packmask.PackmaskError, match="shared-prefix tree rows.*path='auto'"):
        model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    configure(path="auto")
    assert model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits.shape == (1, 9, 128)


def test_describe_paths_reads_the_models_dtype(settings, monkeypatch):
    """describe_paths without dtype= says what a forward of the model would do: a float64 model's mixers
    cannot take the kernels. Control: the same model asked about float32 gets the varlen path."""
    import packmask.recurrent.varlen as varlen

    monkeypatch.setattr(varlen, "kernels_available", lambda package: True)  # as if fla imported
    configure(cpu_kernels=True)
    model = tiny_model("qwen3_5_text").double()
    if not kernel_hooks_available(model.model.layers[0].linear_attn):
        pytest.skip("this transformers gives Qwen3.5's layer no per-instance kernel functions (kernels < 0.19.1)")
    assert [i["path"] for i in describe_paths(model, dtype=torch.float32).values()] == ["varlen"]
    info = list(describe_paths(model).values())
    assert [i["path"] for i in info] == ["generic"] and "float64" in info[0]["why"], info
