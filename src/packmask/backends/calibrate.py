"""Measure the document kernels on this GPU and write the cost table the dispatcher reads.

    python -m packmask.backends.calibrate                 # writes ~/.cache/packmask/kernel_costs.json
    python -m packmask.backends.calibrate --out costs.json --quick

For each head dim (64, 128) and each document length bucket (128 ... 16384), one row of 16384
bf16 tokens made of equal documents runs forward+backward through every kernel that is available
(cudnn, varlen, flex); the table keeps TFLOP/s of in-document work (see :mod:`packmask.backends.costs`).
About a minute on an H100 (flex compiles once per head dim).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .costs import BUCKETS, KERNELS, write_table

ROW = 16384


def _kernels():
    """name -> fn(q, k, v, layout, spec) for the kernels available here."""
    from . import cudnn as cudnn_backend
    from .flex import flex_attention_call
    from .varlen import varlen_attention, varlen_available
    found = {}
    if cudnn_backend.available():
        found["cudnn"] = cudnn_backend.cudnn_attention
    if varlen_available():
        found["varlen"] = varlen_attention
    found["flex"] = flex_attention_call
    return found


def _bench(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def measure(head_dim: int, length: int, kernels: dict, heads_total: int = 2048) -> dict:
    """fwd+bwd TFLOP/s of each kernel on one row of ROW tokens cut into documents of ``length``."""
    from ..layout import DocumentLayout
    from .spec import AttentionSpec
    H = heads_total // head_dim
    Hkv = max(1, H // 4)
    docs = [length] * (ROW // length)
    layout = DocumentLayout.from_seq_lengths([docs], ROW, device="cuda")
    spec = AttentionSpec(scale=head_dim ** -0.5)
    q = torch.randn(1, ROW, H, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    k = torch.randn(1, ROW, Hkv, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    v = torch.randn(1, ROW, Hkv, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    do = torch.randn(1, ROW, H, head_dim, device="cuda", dtype=torch.bfloat16)
    fl = 4.0 * sum(x * x / 2 for x in docs) * H * head_dim * 3.5
    out = {}
    for name, fn in kernels.items():
        def step():
            fn(q, k, v, layout, spec).backward(do)
        try:
            out[name] = fl / _bench(step) / 1e9
        except Exception as e:  # noqa: BLE001 — a kernel that fails here is left out of the table
            print(f"  {name} failed at d={head_dim} len={length}: {e!r:.200}", file=sys.stderr)
            out[name] = None
        q.grad = k.grad = v.grad = None
    return out


def calibrate(head_dims=(64, 128), buckets=BUCKETS) -> dict:
    kernels = _kernels()
    rates = {}
    for d in head_dims:
        rows = {name: [] for name in kernels}
        for length in buckets:
            r = measure(d, length, kernels)
            for name in kernels:
                rows[name].append(r[name])
            print(f"d={d:4d} len={length:6d} " + " ".join(f"{n}={r[n] or 0:6.1f}" for n in kernels), flush=True)
        rates[str(d)] = {n: v for n, v in rows.items() if n in KERNELS}
    return {"buckets": list(buckets), "rates": rates, "setup_ms": _setup_ms(kernels), "unit": "TFLOP/s fwd+bwd, in-document work",
            "row_tokens": ROW, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "cudnn_frontend": _frontend_version()}


def _setup_ms(kernels) -> dict:
    """Once-per-forward preparation a kernel needs (flex: its BlockMask) for a row of ROW tokens;
    the cost model scales it by (row / ROW)² and spreads it over the model's layers."""
    if "flex" not in kernels:
        return {}
    from ..layout import DocumentLayout
    from .flex import document_block_mask
    layout = DocumentLayout.from_seq_lengths([[1024] * (ROW // 1024)], ROW, device="cuda")
    return {"flex": _bench(lambda: document_block_mask(layout, "cuda"))}


def _frontend_version():
    from .cudnn import frontend_version
    return frontend_version()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m packmask.backends.calibrate", description=__doc__.split("\n")[0])
    p.add_argument("--out", help="JSON file to write (default: the user cache, read by the dispatcher)")
    p.add_argument("--quick", action="store_true", help="four length buckets only (a coarser table)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("calibrate needs a CUDA GPU.", file=sys.stderr)
        return 2
    buckets = (256, 1024, 4096, 16384) if args.quick else BUCKETS
    table = calibrate(buckets=buckets)
    path = write_table(torch.cuda.get_device_name(), table, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
