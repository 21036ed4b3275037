"""Probe: does torch's varlen custom op take GQA key/value heads natively on this torch?

torch 2.13's varlen_attn has ``enable_gqa``; 2.11's public function has not, but FlashAttention-2
underneath handles ``num_heads % num_heads_k == 0`` itself. This calls the custom op directly with
fewer kv heads and compares output, gradients, time and peak memory with the expanded-kv call.
"""
import torch
import torch.nn.attention.varlen  # noqa: F401 — registers torch.ops.torch_attn
import triton

from packmask.backends import AttentionSpec
from packmask.backends.varlen import varlen_attention
from packmask.backends.varlen import gqa_native_varlen
from packmask.layout import DocumentLayout

from attention import random_qkv  # benchmarks/attention.py

print(torch.__version__, torch.ops.torch_attn._varlen_attn.default._schema)
dev = "cuda"
total, H, Hkv, D = 16384, 32, 4, 64
lens = [1000, 3000, 500, 2884, 4000, 5000]
layout = DocumentLayout.from_seq_lengths([lens], total, device=dev)
q, k, v, do = random_qkv(total, H, Hkv, D)
spec = AttentionSpec(scale=D ** -0.5)
res = {}
for name, native in [("expanded", False), ("native", True)]:
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        out = varlen_attention(q, k, v, layout, spec, native_gqa=native)
    except Exception as e:  # noqa: BLE001
        print(f"{name}: FAILED {e!r}"[:400], flush=True)
        raise SystemExit(0)
    out.backward(do)
    torch.cuda.synchronize()
    res[name] = (out.detach().float(), q.grad.float().clone(), k.grad.float().clone(), v.grad.float().clone(),
                 (torch.cuda.max_memory_allocated() - base) / 2**20)
    q.grad = k.grad = v.grad = None
    t = triton.testing.do_bench(lambda: varlen_attention(q, k, v, layout, spec, native_gqa=native).backward(do),
                                warmup=10, rep=50, return_mode="median")
    q.grad = k.grad = v.grad = None  # the timing loop accumulated into them
    print(f"{name}: fwd+bwd {t:.3f} ms, peak extra {res[name][-1]:.0f} MiB", flush=True)
rel = lambda a, b: ((a - b).norm() / b.norm()).item()
print("rel err native vs expanded: out %.2e dq %.2e dk %.2e dv %.2e" % tuple(rel(a, b) for a, b in zip(res["native"][:4], res["expanded"][:4])))
