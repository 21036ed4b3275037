"""Tree attention kernels alone (no model): one layer's fwd+bwd on shared-prefix rows, and draft-tree
verification over a KV cache; flex with smaller tiles (kernel_options) probed beside them.

    OUT=out python benchmarks/tree_kernels.py      # GPU: bf16, 32 heads / 4 kv heads, head dim 64 (and 128)

Training rows: 2 x 8192 tokens of ``prompt | chosen | rejected`` (calibrate.preference_tree). Methods:
  tree_triton      one-launch Triton kernel (backends/tree_triton.py)
  tree_varlen      varlen decomposition (pieces with gathered ancestor keys)
  flex_<config>    flex attention over the tree BlockMask with kernel_options (smaller tiles / stages);
                   a config that fails to compile is reported as such (the issue: inductor found no config).
                   FLEX=flex_default,flex_64x64_s2 picks configs (default: all four)
  sdpa_dense       sdpa with the dense [B, 1, N, N] mask
  blockdiag_varlen the same tokens as independent documents (every segment alone): the speed bar
Decode: a 64-token draft tree over an 8192-token cache, batch 1 and 8, forward without grad:
tree_triton (split-KV), varlen (cache part + tree part merged by log-sum-exp), sdpa_dense, flex.

Checks (exit 1 on failure): every method that ran matches sdpa_dense / tree_varlen (output and dq).
Also reports the once-per-forward setup of tree_triton's inputs (tree_kernel_inputs) and of the
varlen pieces. Writes a table and $OUT/tree_kernels.json.
"""
import os
import time

import torch

import packmask
from _report import finish
from packmask.backends import AttentionSpec
from packmask.backends.calibrate import draft_tree, preference_tree

FLEX_CONFIGS = {
    "flex_default": None,
    "flex_64x64_s2": dict(BLOCK_M=64, BLOCK_N=64, num_stages=2, num_warps=4,
                          BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32),
    "flex_64x32_s1": dict(BLOCK_M=64, BLOCK_N=32, num_stages=1, num_warps=4,
                          BLOCK_M1=16, BLOCK_N1=32, BLOCK_M2=32, BLOCK_N2=16),
}
DEV = "cuda"
HEAD_DIMS = [int(d) for d in os.environ.get("HEAD_DIMS", "64,128").split(",")]


def bench(fn, reps=20):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=5, rep=reps * 5, return_mode="median")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def flex_runner(options, block):
    from torch.nn.attention.flex_attention import flex_attention
    from packmask.backends.tree import tree_block_mask
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, layout, spec, training):
        bm = tree_block_mask(layout, k.shape[2], spec.sliding_window, q.device, block=block)
        kw = {"kernel_options": options} if options else {}
        return compiled(q, k, v, block_mask=bm, scale=spec.scale, enable_gqa=k.shape[1] != q.shape[1],
                        **kw).transpose(1, 2)
    return run


def methods(decode):
    from packmask.backends import sdpa as sdpa_backend
    from packmask.backends.tree import tree_varlen_attention
    from packmask.backends.tree_triton import tree_triton_attention
    out = {"tree_triton": lambda q, k, v, lay, spec, tr: tree_triton_attention(q, k, v, lay, spec),
           "tree_varlen": lambda q, k, v, lay, spec, tr: tree_varlen_attention(q, k, v, lay, spec),
           "sdpa_dense": sdpa_backend.run}
    wanted = os.environ.get("FLEX", ",".join(FLEX_CONFIGS) + ",flex_64x64_s2_bm64").split(",")
    for name, opts in FLEX_CONFIGS.items():
        if name in wanted:
            out[name] = flex_runner(opts, 128)
    if "flex_64x64_s2_bm64" in wanted:
        out["flex_64x64_s2_bm64"] = flex_runner(FLEX_CONFIGS["flex_64x64_s2"], 64)
    return out


def blockdiag_step(q, k, v, layout, spec):
    """The same tokens, every segment its own document (varlen): what the tree must match."""
    from packmask.backends.varlen import varlen_flat
    seg = layout.segments()
    B, H, N, D = q.shape
    cu = torch.cat([seg["start"], seg["start"].new_tensor([B * N])]).to(torch.int32).to(q.device)
    mx = int(seg["length"].max())
    qf = q.transpose(1, 2).reshape(B * N, H, D)
    kf, vf = (x.transpose(1, 2).reshape(B * N, x.shape[1], D) for x in (k, v))
    return varlen_flat(qf, kf, vf, cu, cu, mx, mx, scale=spec.scale, window_size=(-1, 0)).view(B, N, H, D)


def run_case(label, layout, D, decode, results, failures):
    torch.manual_seed(0)
    H, Hkv = 2048 // D, 2048 // D // 8
    B, N, K = layout.batch_size, layout.seq_len, layout.key_len
    spec = AttentionSpec(scale=D ** -0.5)
    q = torch.randn(B, N, H, D, device=DEV, dtype=torch.bfloat16).transpose(1, 2).requires_grad_(not decode)
    k = torch.randn(B, Hkv, K, D, device=DEV, dtype=torch.bfloat16, requires_grad=not decode)
    v = torch.randn(B, Hkv, K, D, device=DEV, dtype=torch.bfloat16, requires_grad=not decode)
    do = torch.randn(B, N, H, D, device=DEV, dtype=torch.bfloat16)
    outs = {}
    todo = list(methods(decode).items())
    if not decode:
        todo.append(("blockdiag_varlen", lambda q, k, v, lay, spec, tr: blockdiag_step(q, k, v, lay, spec)))
    for name, fn in todo:
        row = dict(case=label, head_dim=D, method=name)
        try:
            if decode:
                with torch.no_grad():
                    out = fn(q, k, v, layout, spec, False)
                    row["ms"] = bench(lambda: fn(q, k, v, layout, spec, False))
                outs[name] = (out, None)
            else:
                out = fn(q, k, v, layout, spec, True)
                dq, = torch.autograd.grad(out, q, do)
                outs[name] = (out.detach(), dq)
                row["fwd_ms"] = bench(lambda: fn(q, k, v, layout, spec, True))
                row["ms"] = bench(lambda: torch.autograd.grad(fn(q, k, v, layout, spec, True), (q, k, v), do))
        except Exception as e:  # noqa: BLE001 — flex configs may fail to compile: reported, not a failure
            kind = "compile_failed" if name.startswith("flex") else "error"
            row[kind] = f"{type(e).__name__}: {str(e)[:240]}"
            if kind == "error":
                failures.append(f"{label} d={D} {name}: {row[kind]}")
        results.append(row)
        print(f"  {label} d={D} {name}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in row.items() if k not in ("case", "head_dim", "method")),
              flush=True)  # a run cut short by a timeout still shows what it measured
    ref_name = "sdpa_dense" if "sdpa_dense" in outs else "tree_varlen"
    for name, (out, dq) in outs.items():
        if name == "blockdiag_varlen" or name == ref_name:
            continue
        ro, rdq = outs[ref_name]
        err = max(rel(out, ro), rel(dq, rdq) if dq is not None else 0.0)
        results.append(dict(case=label, head_dim=D, method=f"check_{name}_vs_{ref_name}", rel_err=err))
        if err > 2e-2:
            failures.append(f"{label} d={D}: {name} differs from {ref_name} by {err:.2e}")
    # once-per-forward setup (new layout object each time: nothing cached)
    from packmask.backends.tree import tree_pieces
    from packmask.backends.tree_triton import tree_kernel_inputs
    fresh = lambda: type(layout)(layout.parent, layout.cache_start, layout.past, layout.depth)  # noqa: E731
    results.append(dict(case=label, head_dim=D, method="setup_tree_kernel_inputs",
                        ms=bench(lambda: tree_kernel_inputs(fresh(), K, None, 128, 64, DEV))))
    results.append(dict(case=label, head_dim=D, method="setup_varlen_pieces", ms=bench(lambda: tree_pieces(fresh(), K))))


def main():
    if not torch.cuda.is_available():
        print("tree_kernels needs a CUDA GPU (the CPU tests cover correctness: tests/backends/test_tree_triton.py)")
        return
    torch._dynamo.config.cache_size_limit = 64
    results, failures = [], []
    for D in HEAD_DIMS:
        run_case("train_2x8192", preference_tree(), D, False, results, failures)
        for B in (1, 8):
            run_case(f"decode_b{B}_64_over_8192", draft_tree(B, 8192), D, True, results, failures)
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, packmask=packmask.__version__,
               date=time.strftime("%Y-%m-%d", time.gmtime()))
    print(f"\ntree_kernels: {env}")
    print(f"{'case':<26}{'d':>4} {'method':<34}{'ms':>9}{'fwd ms':>9}{'x blockdiag':>12}")
    bar = {(r["case"], r["head_dim"]): r.get("ms") for r in results if r["method"] == "blockdiag_varlen"}
    for r in results:
        if "ms" in r:
            b = bar.get((r["case"], r["head_dim"]))
            ratio = f"{b / r['ms']:.3f}" if b else "-"
            fwd = f"{r['fwd_ms']:.3f}" if "fwd_ms" in r else "-"
            print(f"{r['case']:<26}{r['head_dim']:>4} {r['method']:<34}{r['ms']:>9.3f}{fwd:>9}{ratio:>12}")
        elif "rel_err" in r:
            print(f"{r['case']:<26}{r['head_dim']:>4} {r['method']:<34} rel err {r['rel_err']:.1e}")
        else:
            print(f"{r['case']:<26}{r['head_dim']:>4} {r['method']:<34} {r.get('compile_failed') or r.get('error')}")
    finish("tree_kernels", dict(env=env, results=results, failures=failures), failures)


if __name__ == "__main__":
    main()
