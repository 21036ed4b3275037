"""Runs packmask's varlen recurrent path under Triton's CPU interpreter and prints what it measured as
one JSON line (tests/recurrent/test_recurrent_varlen.py starts it in a fresh process:
``TRITON_INTERPRET=1`` must be set before triton compiles anything).

For each family: a tiny fp32 model on two packed rows, run (1) on the varlen path (flash-linear-
attention's kernels with the layout's ``cu_seqlens``, forced), (2) on the generic per-sequence path,
(3) each document alone, (4) the control: the varlen path with the kernels given only the row
boundaries (the packed documents of a row run as one sequence through the mixer). Relative errors
of logits, loss and every parameter gradient.

Interpreter harness (this process only, not packmask): the interpreter has no benchmarker, so each
autotuned kernel runs its first config; ``range`` inside a kernel yields triton tensors as compiled
code does (fla calls ``.to`` on loop indices).
"""
import builtins
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton.runtime.autotuner as autotuner
import triton.runtime.interpreter as interpreter

import packmask
import packmask.recurrent.kernels as kernels
from packmask.recurrent import configure
from packmask.reference import pack_rows, rel_err, run_alone
from packmask.testing import tiny_model

_prune = autotuner.Autotuner.prune_configs
autotuner.Autotuner.prune_configs = lambda self, kwargs, *a, **k: _prune(self, kwargs, *a, **k)[:1]


def _tensor_range(*args):
    for i in builtins.range(*[int(a.handle.data.item()) if hasattr(a, "handle") else int(a) for a in args]):
        yield interpreter._implicit_cvt(i)


_grid_call = interpreter.GridExecutor.__call__


def _grid_call_with_range(self, *args, **kwargs):
    scope = self.fn.__globals__
    had, old = "range" in scope, scope.get("range")
    scope["range"] = _tensor_range
    try:
        return _grid_call(self, *args, **kwargs)
    finally:
        if had:
            scope["range"] = old
        else:
            scope.pop("range", None)


interpreter.GridExecutor.__call__ = _grid_call_with_range

SEQ_LENGTHS = [[5, 4, 7], [9, 7]]
#: the decay path of a gated delta net (g = -exp(A_log) * softplus(in_proj_a(x) + dt_bias)): fla's fp32
#: kernels round its gradients ~3e-5 away from an fp64 reference, the same with or without packing
#: (measured: fla on each document alone 4.0e-5, fla packed 2.7e-5, transformers' torch kernels 2e-7)
DECAY = ("A_log", "dt_bias", "in_proj_a")  # Mamba2's A_log / dt_bias too: 8e-6 there
N = 16


def doc_loss(logits, ids, slices):
    """Next-token cross entropy inside every document (never across a boundary)."""
    return sum(F.cross_entropy(logits[b, s:s + n - 1].float(), ids[b, s + 1:s + n], reduction="sum")
               for b, s, n in slices)


def run(family, ids, mode):
    model = tiny_model(family)
    slices, _ = pack_rows(SEQ_LENGTHS, N)
    if mode == "alone":
        logits = run_alone(model, ids, slices)
    else:
        previous = configure(path="generic" if mode == "generic" else "varlen", cpu_kernels=True)
        try:
            logits = model(input_ids=ids, seq_lengths=SEQ_LENGTHS).logits
        finally:
            configure(**previous)
    loss = doc_loss(logits, ids, slices)
    loss.backward()
    return model, logits.detach(), loss.detach()


class _RowOnly(kernels.Boundaries):
    """The control: the kernels see only the row boundaries, not the documents'."""

    def __init__(self, layout):
        super().__init__(layout)
        self.cu_seqlens = torch.arange(0, layout.batch_size * layout.seq_len + 1, layout.seq_len)

    @classmethod
    def of(cls, layout):
        return cls(layout)


def compare(family):
    ids = torch.randint(3, 100, (2, N), generator=torch.Generator().manual_seed(0))
    varlen, v_logits, v_loss = run(family, ids, "varlen")
    result = {}
    for mode in ("generic", "alone"):
        ref, r_logits, r_loss = run(family, ids, mode)
        grads = {name: rel_err(p.grad, dict(ref.named_parameters())[name].grad)
                 for name, p in varlen.named_parameters() if p.grad is not None and p.grad.norm() > 0}
        decay = [e for name, e in grads.items() if set(name.split(".")) & set(DECAY)]
        other = [e for name, e in grads.items() if not set(name.split(".")) & set(DECAY)]
        result[mode] = {"logits": rel_err(v_logits, r_logits), "loss": rel_err(v_loss, r_loss),
                        "grads": max(other), "decay_grads": max(decay, default=0.0), "count": len(grads)}
    real = kernels.Boundaries
    kernels.Boundaries = _RowOnly
    import packmask.recurrent.varlen as varlen_module
    varlen_module.Boundaries = _RowOnly
    try:
        _, c_logits, _ = run(family, ids, "varlen")
    finally:
        kernels.Boundaries = varlen_module.Boundaries = real
    result["control"] = rel_err(c_logits, v_logits)
    return result


def main():
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1, as test_recurrent_varlen.py does")
    families = sys.argv[1:] or ["qwen3_5_text"]
    results = {}
    for family in families:
        try:
            results[family] = compare(family)
        except Exception as error:  # noqa: BLE001 - reported per family; the test reads it as a failure
            results[family] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    print(json.dumps(results))


if __name__ == "__main__":
    packmask  # imported for its registration of attn_implementation="packmask"
    main()
