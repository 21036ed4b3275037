"""Measure the document kernels on this GPU and write the cost table the dispatcher reads.

    python -m packmask.backends.calibrate                 # writes ~/.cache/packmask/kernel_costs.json
    python -m packmask.backends.calibrate --out costs.json --quick

For each head dim (64, 128) and each document length bucket (128 ... 16384), one row of 16384
bf16 tokens made of equal documents runs forward+backward through every kernel that is available
(cudnn, varlen, flex); the table keeps TFLOP/s of in-document work (see :mod:`packmask.backends.costs`).
About a minute on an H100 (flex compiles once per head dim).

Tree layouts get their own rows (:func:`packmask.backends.costs.choose_tree_kernel`): ``tree``, the
fwd+bwd ms of every tree kernel on two 8192-token rows of ``prompt | chosen | rejected`` examples,
and ``decode``, the forward ms of a 64-token draft tree over a KV cache (batch 1 and 8, cache 1024
and 8192) for each kernel including dense sdpa. ``--trees-only`` measures just those and merges them
into this GPU's existing table (seconds).
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


# ---- tree layouts (tree-kernel) -------------------------------------------------------------------------
def preference_tree(rows: int = 2, row: int = ROW // 2, seed: int = 0, device="cuda"):
    """Rows of ``prompt | chosen | rejected`` examples (lognormal lengths, medians 160 / 250), depth-first."""
    from ..layout_tree import analyse_tree_mask
    from ..masks import tree_mask_from_segments
    g = torch.Generator().manual_seed(seed)
    segs = []
    for _ in range(rows):
        out, used = [], 0
        while True:
            p, c, r = ((torch.randn(3, generator=g) * 0.6 + torch.tensor([5.07, 5.52, 5.52])).exp().long() + 4).tolist()
            if used + p + c + r > row:
                break
            root = len(out)
            out += [(used, p, -1), (used + p, c, root), (used + p + c, r, root)]
            used += p + c + r
        out.append((used, row - used, -1)) if used < row else None
        segs.append(out)
    return analyse_tree_mask(tree_mask_from_segments(segs, row, device=device)[0])


def draft_tree(batch: int, past: int, n: int = 64, device="cuda"):
    """An EAGLE/Medusa-like draft tree of ``n`` tokens (breadth-first order) over a ``past``-token cache."""
    from ..layout_tree import TreeLayout
    g = torch.Generator().manual_seed(0)
    parents = [-1, -1, -1, -1]
    while len(parents) < n:
        i = len(parents)
        parents.append(int(torch.randint(max(0, i - 6), i, (1,), generator=g)))
    return TreeLayout.from_parents(torch.tensor([parents] * batch, device=device), past)


def _tree_runners(decode: bool) -> dict:
    from . import backend_module
    from .flex import flex_attention_call
    names = ["tree_triton", "varlen", "sdpa"] if decode else ["tree_triton", "varlen"]
    runners = {n: (lambda m: lambda q, k, v, lay, spec, train: m.run(q, k, v, lay, spec, train))(backend_module(n))
               for n in names}
    runners["flex"] = lambda q, k, v, lay, spec, train: flex_attention_call(q, k, v, lay, spec)
    return runners


def measure_tree(head_dim: int, layout, decode: bool, heads_total: int = 2048, device="cuda") -> dict:
    """ms of each tree kernel on ``layout`` (training: fwd+bwd; decode: forward without grad); None
    where a kernel refuses or fails."""
    from . import AttentionSpec, BACKENDS, backend_module
    H = heads_total // head_dim
    Hkv = max(1, H // 8)
    B, N, K = layout.batch_size, layout.seq_len, layout.key_len
    spec = AttentionSpec(scale=head_dim ** -0.5)
    q = torch.randn(B, N, H, head_dim, device=device, dtype=torch.bfloat16).transpose(1, 2).requires_grad_(not decode)
    k = torch.randn(B, Hkv, K, head_dim, device=device, dtype=torch.bfloat16).requires_grad_(not decode)
    v = torch.randn(B, Hkv, K, head_dim, device=device, dtype=torch.bfloat16).requires_grad_(not decode)
    do = torch.randn(B, N, H, head_dim, device=device, dtype=torch.bfloat16)
    out = {}
    for name, fn in _tree_runners(decode).items():
        if name in BACKENDS[1:] and backend_module(name).refusal(layout, spec, q, not decode) is not None:
            out[name] = None
            continue
        if decode:
            def step():
                with torch.no_grad():
                    fn(q, k, v, layout, spec, False)
        else:
            def step():
                fn(q, k, v, layout, spec, True).backward(do)
        try:
            out[name] = _bench(step)
        except Exception as e:  # noqa: BLE001 — a kernel that fails here is left out of the table
            print(f"  {name} failed on a {'decode' if decode else 'tree'} layout: {e!r:.200}", file=sys.stderr)
            out[name] = None
        q.grad = k.grad = v.grad = None
    return out


def calibrate_trees(head_dims=(64, 128)) -> dict:
    tree, decode = {}, {}
    train_layout = preference_tree()
    for d in head_dims:
        tree[str(d)] = measure_tree(d, train_layout, decode=False)
        print(f"tree   d={d:4d} " + " ".join(f"{n}={ms or 0:7.3f}ms" for n, ms in tree[str(d)].items()), flush=True)
        decode[str(d)] = []
        for batch in (1, 8):
            for past in (1024, 8192):
                ms = measure_tree(d, draft_tree(batch, past), decode=True)
                decode[str(d)].append(dict(batch=batch, past=past, queries=64, ms=ms))
                print(f"decode d={d:4d} batch={batch} past={past:5d} "
                      + " ".join(f"{n}={t or 0:7.3f}ms" for n, t in ms.items()), flush=True)
    return {"tree": tree, "decode": decode,
            "tree_note": "tree: fwd+bwd ms, 2 rows x 8192 prompt|chosen|rejected; decode: forward ms, 64-token "
                         "draft tree; bf16, heads = 2048 / head_dim, kv heads = heads / 8"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m packmask.backends.calibrate", description=__doc__.split("\n")[0])
    p.add_argument("--out", help="JSON file to write (default: the user cache, read by the dispatcher)")
    p.add_argument("--quick", action="store_true", help="four length buckets only (a coarser table)")
    p.add_argument("--trees-only", action="store_true",
                   help="measure only the tree and decode rows, merged into this GPU's existing table")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("calibrate needs a CUDA GPU.", file=sys.stderr)
        return 2
    buckets = (256, 1024, 4096, 16384) if args.quick else BUCKETS
    name = torch.cuda.get_device_name()
    if args.trees_only:
        from .costs import load_table
        existing = {k: v for k, v in (load_table(name) or {}).items() if k != "source"}  # the user's, else shipped
        table = dict(existing, **calibrate_trees())
    else:
        table = dict(calibrate(buckets=buckets), **calibrate_trees())
    path = write_table(name, table, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
