"""Kernel benchmark: document-masked attention forward+backward, bf16, per backend.

TFLOP/s count only in-document work (causal: 4 * sum(l²)/2 * H * D forward, x3.5 fwd+bwd); the
plain-causal cuDNN / flash rows attend over the whole row and count the whole row — they are the
ceiling (and contaminated). Same shapes as ../shared/anchors/kernel_anchor.py. Also times the
flex BlockMask build: create_block_mask (evaluates the mask) vs packmask's build from offsets.
With nvidia-cudnn-frontend installed, also packmask's cudnn backend (cuDNN SDPA with ragged
offsets) and the dispatcher's own choice ("packmask_auto"). Correctness: every packmask kernel's
output is compared with varlen's on the benchmark data; the script exits 1 if one differs by more
than the bf16 noise. Writes $OUT/attention.json.
"""
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask

from packmask.backends import AttentionSpec
from packmask.backends.varlen import varlen_attention
from packmask.backends import cudnn as cudnn_backend
from packmask.backends.flex import compiled_flex_attention, document_block_mask
from packmask.layout import DocumentLayout

dev = "cuda"


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def lengths_for(total, median, seed):
    g = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < total:
        lens.append(int(min(max(8, math.exp(torch.randn(1, generator=g).item() + math.log(median))), total - sum(lens))))
    return [x for x in lens if x > 0]


def random_qkv(total, H, Hkv, D, device=dev):
    """bf16 q [1, H, T, D], k / v [1, Hkv, T, D] needing grads, and an output gradient [1, T, H, D].

    q / k / v are transposed views of [1, T, heads, D] tensors: what transformers hands to an
    attention function (projections viewed as heads, then transposed)."""
    def make(*shape, grad=True):
        return torch.randn(*shape, device=device, dtype=torch.bfloat16, requires_grad=grad)

    def heads(h):
        return torch.randn(1, total, h, D, device=device, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    return heads(H), heads(Hkv), heads(Hkv), make(1, total, H, D, grad=False)


def run(total, H, Hkv, D, median):
    lens = lengths_for(total, median, total + H)
    layout = DocumentLayout.from_seq_lengths([lens], total, device=dev)
    q, k, v, do = random_qkv(total, H, Hkv, D)
    flops_doc = 2 * 2 * sum(x * x / 2 for x in lens) * H * D * 3.5
    flops_full = 2 * 2 * total * total / 2 * H * D * 3.5
    rep = H // Hkv
    spec = AttentionSpec(scale=D ** -0.5)
    out = {}

    def fb(f, layout_bhnd=False):
        def step():
            o = f()
            o.backward(do.transpose(1, 2) if layout_bhnd else do)
        return step

    # the whole-row baselines get contiguous [1, heads, T, D] copies (their fastest layout)
    qb = q.detach().contiguous().requires_grad_()
    kr, vr = (t.detach().repeat_interleave(rep, 1).contiguous().requires_grad_() for t in (k, v))
    for name, backend in [("cudnn_causal_full", SDPBackend.CUDNN_ATTENTION), ("flash_causal_full", SDPBackend.FLASH_ATTENTION)]:
        try:
            with sdpa_kernel([backend]):
                t = bench(fb(lambda: F.scaled_dot_product_attention(qb, kr, vr, is_causal=True), True))
            out[name] = dict(ms=t, tflops=flops_full / t / 1e9)
        except Exception as e:
            out[name] = dict(error=repr(e)[:200])
    t = bench(fb(lambda: varlen_attention(q, k, v, layout, spec)))
    out["packmask_varlen"] = dict(ms=t, tflops=flops_doc / t / 1e9)
    with torch.no_grad():
        reference = varlen_attention(q, k, v, layout, spec).float()
    checks = {}
    kernels = {}
    if cudnn_backend.available():
        kernels["packmask_cudnn"] = lambda: cudnn_backend.cudnn_attention(q, k, v, layout, spec)
    try:
        from packmask.backends import attend, choose_backend
        kernels["packmask_auto"] = lambda: attend(q, k, v, layout, spec, training=True)
        out["auto_choice"] = choose_backend(layout, spec, q, True)
        from packmask.backends import describe_choice
        out["auto_choice_detail"] = describe_choice(layout, spec, q, training=True)
    except ImportError:
        pass
    for name, fn in kernels.items():
        t = bench(fb(fn))
        out[name] = dict(ms=t, tflops=flops_doc / t / 1e9)
        with torch.no_grad():
            got = fn().float()
        checks[name] = ((got - reference).norm() / reference.norm()).item()
    out["workspace_bytes"] = cudnn_backend.workspace_bytes() if cudnn_backend.available() else 0
    if os.environ.get("QUICK") == "1":  # kernels only: no flex compile, no dense mask
        return report(total, H, Hkv, D, median, lens, out, checks)
    flex = compiled_flex_attention()
    bm = document_block_mask(layout, dev)
    t = bench(fb(lambda: flex(q, k, v, block_mask=bm, scale=spec.scale, enable_gqa=rep > 1).transpose(1, 2)))
    out["packmask_flex"] = dict(ms=t, tflops=flops_doc / t / 1e9)
    doc = layout.doc_ids

    def mm(b, h, qi, ki):
        return (doc[b, qi] == doc[b, ki]) & (qi >= ki)
    out["block_mask_build_create_block_mask"] = dict(ms=bench(lambda: create_block_mask(mm, 1, None, total, total, device=dev, _compile=True)))
    out["block_mask_build_from_offsets"] = dict(ms=bench(lambda: document_block_mask(layout, dev)))
    dense = layout.dense_mask()
    t = bench(fb(lambda: F.scaled_dot_product_attention(qb, kr, vr, attn_mask=dense), True))
    out["sdpa_dense_mask"] = dict(ms=t, tflops=flops_doc / t / 1e9)
    return report(total, H, Hkv, D, median, lens, out, checks)


def report(total, H, Hkv, D, median, lens, out, checks):
    cudnn = out.get("cudnn_causal_full", {}).get("tflops")
    print(f"total={total} docs={len(lens)} H={H}/{Hkv} D={D} median={median}")
    for name, r in out.items():
        if not isinstance(r, dict) or name == "auto_choice_detail":
            print(f"   {name}: {r}")
            continue
        extra = f"{r['tflops']:7.1f} TFLOP/s" if "tflops" in r else ""
        frac = f"  {r['tflops'] / cudnn:5.2f} of cuDNN causal" if cudnn and "tflops" in r else ""
        print(f"   {name:38s} {r.get('ms', float('nan')):8.3f} ms {extra}{frac}", flush=True)
    print(f"   rel. difference to varlen: {checks}")
    return dict(total=total, H=H, Hkv=Hkv, D=D, docs=len(lens), median=median, results=out, diff_vs_varlen=checks,
                ok=all(x < 2e-2 for x in checks.values()))


def main():
    torch.manual_seed(0)
    import torch.nn.attention as attn
    print("flash attention impls:", getattr(attn, "list_flash_attention_impls", lambda: "n/a")())
    rows = []
    for shape in [(16384, 16, 16, 128, 1500), (16384, 32, 4, 64, 400), (65536, 16, 8, 128, 4000)]:
        try:
            rows.append(run(*shape))
        except Exception as e:
            print("FAILED", shape, repr(e)[:300])
            rows.append(dict(shape=shape, error=repr(e)[:300]))
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
               cudnn=torch.backends.cudnn.version(),
               cudnn_frontend=getattr(cudnn_backend._frontend(), "__version__", None))
    if os.environ.get("OUT"):
        json.dump(dict(env=env, rows=rows), open(os.path.join(os.environ["OUT"], "attention.json"), "w"), indent=1)
    print("\n| shape | cuDNN causal, whole row | " + " | ".join(k for k in ("packmask_varlen", "packmask_flex",
          "packmask_cudnn", "packmask_auto")) + " |")
    for r in rows:
        if "results" not in r:
            continue
        res = r["results"]
        ref = res.get("cudnn_causal_full", {}).get("tflops")
        cells = []
        for k in ("packmask_varlen", "packmask_flex", "packmask_cudnn", "packmask_auto"):
            tf = res.get(k, {}).get("tflops")
            cells.append("–" if tf is None else f"{tf:.0f} ({tf / ref:.2f})" if ref else f"{tf:.0f}")
        print(f"| {r['total']}, {r['H']}/{r['Hkv']}, {r['D']}, {r['docs']} docs | {ref or 0:.0f} | " + " | ".join(cells) + " |")
    if not all(r.get("ok", False) for r in rows):
        print("CORRECTNESS CHECK FAILED")
        sys.exit(1)


if __name__ == "__main__":
    main()
