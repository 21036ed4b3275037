"""Probe: cuDNN ragged attention through torch.ops.aten._cudnn_attention_forward (cu_seqlens).

torch's varlen_attn has a cuDNN branch that is switched off; this calls the aten op directly and
compares output and gradients with FA2 varlen, then times fwd+bwd on the kernel-anchor shapes.
Each shape runs under a wall-clock guard (cuDNN builds a plan per new shape).

Result on one H100, torch 2.11.0+cu130, cuDNN 9.19, 2026-11-25 — not usable, which is presumably why
torch switched that branch off: the output matches FA2 (rel. err 1.6e-3) but dq / dk are wrong
(rel. err 2e10 / 4e8 at 16384 tokens, 9 docs), fwd+bwd takes 162 ms vs FA2 varlen's 3.7 ms, every
new layout costs ~65-160 ms, and 65536 tokens hit an illegal memory access.
"""
import signal
import time

import torch
import triton

from packmask.backends import AttentionSpec, varlen_attention
from packmask.layout import DocumentLayout

from attention import lengths_for, random_qkv  # benchmarks/attention.py: the kernel-anchor document lengths

dev = "cuda"


def cudnn_varlen(qf, kf, vf, cu, mx, scale):
    out = torch.ops.aten._cudnn_attention_forward(qf, kf, vf, None, cu, cu, mx, mx, True, 0.0, True, False, scale=scale)
    return out[0]


class Timeout(Exception):
    pass


def alarm(*_):
    raise Timeout()


def run(total, H, Hkv, D, median):
    lens = lengths_for(total, median, total + H)
    layout = DocumentLayout.from_seq_lengths([lens], total, device=dev)
    q, k, v, do = random_qkv(total, H, Hkv, D)
    spec = AttentionSpec(scale=D ** -0.5)
    rep = H // Hkv
    ref = varlen_attention(q, k, v, layout, spec)
    ref.backward(do)
    gq, gk, gv = q.grad.clone(), k.grad.clone(), v.grad.clone()
    q.grad = k.grad = v.grad = None
    cu = layout.cu_seqlens
    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    try:
        t0 = time.perf_counter()

        def f():
            qf = q.transpose(1, 2).reshape(total, H, D)
            kf = k.transpose(1, 2).reshape(total, Hkv, D).repeat_interleave(rep, 1)
            vf = v.transpose(1, 2).reshape(total, Hkv, D).repeat_interleave(rep, 1)
            return cudnn_varlen(qf, kf, vf, cu, layout.max_seqlen, spec.scale).view(1, total, H, D)
        out = f()
        out.backward(do)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
        errs = dict(out=rel(out, ref), dq=rel(q.grad, gq), dk=rel(k.grad, gk), dv=rel(v.grad, gv))
        flops = 2 * 2 * sum(x * x / 2 for x in lens) * H * D * 3.5

        def fb(g):
            def s():
                g().backward(do)
            return s
        t_c = triton.testing.do_bench(fb(f), warmup=10, rep=50, return_mode="median")
        t_v = triton.testing.do_bench(fb(lambda: varlen_attention(q, k, v, layout, spec)), warmup=10, rep=50, return_mode="median")
        print(f"{total=} docs={len(lens)} H={H}/{Hkv} D={D}: first call {first:.2f}s errs {errs} "
              f"cudnn {t_c:.3f} ms {flops / t_c / 1e9:.0f} TFLOP/s | FA2 varlen {t_v:.3f} ms {flops / t_v / 1e9:.0f} TFLOP/s", flush=True)
        # a new layout of the same total: does cuDNN rebuild a plan?
        lens2 = lengths_for(total, median, total + H + 1)
        l2 = DocumentLayout.from_seq_lengths([lens2], total, device=dev)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        o2 = cudnn_varlen(q.detach().transpose(1, 2).reshape(total, H, D), k.detach().transpose(1, 2).reshape(total, Hkv, D).repeat_interleave(rep, 1),
                          v.detach().transpose(1, 2).reshape(total, Hkv, D).repeat_interleave(rep, 1), l2.cu_seqlens, l2.max_seqlen, spec.scale)
        torch.cuda.synchronize()
        print(f"   new layout forward: {(time.perf_counter() - t0) * 1e3:.1f} ms", flush=True)
    except Timeout:
        print(f"{total=} H={H}/{Hkv} D={D}: cuDNN timed out (60 s)", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"{total=} H={H}/{Hkv} D={D}: cuDNN failed {repr(e)[:300]}", flush=True)
    finally:
        signal.alarm(0)


if __name__ == "__main__":
    print(torch.__version__, torch.backends.cudnn.version(), torch.cuda.get_device_name())
    for shape in [(16384, 16, 16, 128, 1500), (16384, 32, 4, 64, 400), (65536, 16, 8, 128, 4000)]:
        run(*shape)
