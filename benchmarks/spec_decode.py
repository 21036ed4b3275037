"""Speculative decoding: verify a 64-token draft tree over an 8,192-token KV cache in one forward.

    OUT=out python benchmarks/spec_decode.py      # GPU: TinyLlama-shaped (22 layers), bf16, batch 1 and 8

Competitors, same model weights, same cache, same run:
  sdpa_dense4d      transformers' sdpa with the dense [B, 1, 64, 8192 + 64] bool tree mask
  packmask_<name>   attn_implementation="packmask" with the same mask; backend auto / tree_triton (the
                    one-launch Triton kernel, split-KV over the cache) / varlen (cache part and tree part
                    merged by log-sum-exp) / flex / sdpa (packmask's dense-mask path)

Times one verification forward (the attention implementation switched before the timed loop, not in it;
cache cropped back after each; a new mask tensor each forward, as in a
decoding loop, unless FRESH_MASK=0), peak memory above the cache and
weights, and on a GPU where the time goes (``where_time_goes``: host time to launch the forward,
GPU busy time, of which attention kernels), and checks: (1) every method's logits against sdpa's, (2) packmask's logits of one
root-to-leaf path against that path run alone after the cache (plain causal). Exits 1 when a check
fails. On CPU it shrinks to a smoke test. Writes a table and $OUT/spec_decode.json.
"""
import contextlib
import inspect
import json
import os
import sys
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import packmask
from _report import finish

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.bfloat16 if DEV == "cuda" else torch.float32
SMALL = DEV == "cpu"
PAST = 256 if SMALL else int(os.environ.get("PAST", 8192))
DRAFT = 64
BATCHES = [1, 2] if SMALL else [1, 8]
ITERS = 3 if SMALL else int(os.environ.get("ITERS", 20))
# a new mask tensor every forward, as in a decoding loop (packmask analyses each new mask once per forward);
# FRESH_MASK=0 reuses one tensor (its analysis is then cached across forwards)
FRESH_MASK = os.environ.get("FRESH_MASK", "1") == "1"
TOL = 1e-4 if SMALL else 5e-2  # bf16 over 22 layers, different kernels
CACHE_KW = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def draft_parents(n=DRAFT, seed=0):
    """A draft tree like EAGLE/Medusa's: a few candidates per level, deeper along likely branches."""
    g = torch.Generator().manual_seed(seed)
    parents = [-1, -1, -1, -1]
    while len(parents) < n:
        i = len(parents)
        parents.append(int(torch.randint(max(0, i - 6), i, (1,), generator=g)))
    return torch.tensor(parents)


def make_model():
    cfg = LlamaConfig(vocab_size=32000, hidden_size=256 if SMALL else 2048, intermediate_size=512 if SMALL else 5632,
                      num_hidden_layers=2 if SMALL else 22, num_attention_heads=4 if SMALL else 32,
                      num_key_value_heads=2 if SMALL else 4, max_position_embeddings=PAST + 2 * DRAFT,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(DEV, DT).eval()


def forced(name):
    return contextlib.nullcontext() if name == "auto" else packmask.backend(name)


def trim(cache):
    """Drop what a verification forward appended (per layer: a failed forward may have updated only some)."""
    for layer in cache.layers:
        extra = layer.get_seq_length() - PAST
        if extra > 0:
            layer.crop(-extra)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


ATTENTION_KERNELS = ("fmha", "attention", "flash", "attn", "tree_")  # kernel-name parts of attention kernels


def where_time_goes(call, iters=3) -> dict:
    """Host vs device time of one forward (GPU only): ``host_ms``, how long ``call`` takes to return with an
    empty queue (launching everything; no sync); ``gpu_busy_ms``, the sum of its kernels' device time
    (torch.profiler), of which ``gpu_attention_ms`` in attention kernels. host_ms close to the forward's
    time and gpu_busy_ms well below it: the forward is bound by the host (Python and launches), not the GPU."""
    host = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        call()
        host.append(time.perf_counter() - t0)
        sync()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        sync()
    busy = attention = 0.0
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        us = us if us is not None else getattr(e, "self_cuda_time_total", 0.0)
        busy += us
        if any(part in e.key.lower() for part in ATTENTION_KERNELS):
            attention += us
    return dict(host_ms=min(host) * 1e3, gpu_busy_ms=busy / 1e3, gpu_attention_ms=attention / 1e3)


@torch.no_grad()
def main():
    model = make_model()
    results, failures = [], []
    for B in BATCHES:
        torch.manual_seed(B)
        prefix = torch.randint(1, 32000, (B, PAST), device=DEV)
        model.set_attn_implementation("sdpa")
        cache = model(input_ids=prefix, use_cache=True, logits_to_keep=1).past_key_values
        parents = draft_parents().to(DEV)
        mask, pos = packmask.tree_mask(parents.expand(B, -1), PAST)
        ids = torch.randint(1, 32000, (B, DRAFT), device=DEV)
        base = torch.cuda.memory_allocated() if DEV == "cuda" else 0

        def verify(impl, backend="auto"):
            if model.config._attn_implementation != impl:  # switched outside the timed loops (not free)
                model.set_attn_implementation(impl)
            try:
                with forced(backend):
                    return model(input_ids=ids, attention_mask=(mask.clone() if FRESH_MASK else mask)[:, None],
                                 position_ids=pos, use_cache=True,
                                 **{CACHE_KW: cache}).logits
            finally:
                trim(cache)

        methods = [("sdpa_dense4d", "sdpa", "auto")] + [(f"packmask_{b}", "packmask", b)
                                                        for b in ("auto", "tree_triton", "varlen", "flex", "sdpa")]
        ref_logits = None
        for name, impl, backend in methods:
            row = dict(batch=B, method=name, past=PAST, draft=DRAFT)
            try:
                model.set_attn_implementation(impl)
                for _ in range(2 if SMALL else 3):
                    logits = verify(impl, backend)
                sync()
                if DEV == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                for _ in range(ITERS):
                    logits = verify(impl, backend)
                sync()
                row["ms"] = (time.perf_counter() - t0) / ITERS * 1e3
                row["peak_extra_mib"] = ((torch.cuda.max_memory_allocated() - base) / 2**20) if DEV == "cuda" else None
                if DEV == "cuda":
                    row.update(where_time_goes(lambda: verify(impl, backend)))
                if ref_logits is None:
                    ref_logits = logits.float()
                err = ((logits.float() - ref_logits).norm() / ref_logits.norm()).item()
                row["rel_err_vs_sdpa"] = err
                if err > TOL:
                    failures.append(f"{name} batch {B}: logits differ from sdpa by {err:.2e}")
            except Exception as e:  # noqa: BLE001 — a method that cannot run is reported, not fatal
                if isinstance(e, packmask.PackmaskError) and "cannot run this layer" in str(e):
                    row["refused"] = str(e)[:300]
                else:
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    if impl == "packmask":  # a packmask kernel that accepted the call must not fail
                        failures.append(f"{name} batch {B}: {row['error']}")
            results.append(row)
        # path check: the deepest leaf's root-to-leaf path alone after the cache, plain causal
        depth = pos[0] - PAST
        leaf = int(depth.argmax())
        path, j = [], leaf
        while j >= 0:
            path.append(j)
            j = int(parents[j])
        path = torch.tensor(path[::-1], device=DEV)
        model.set_attn_implementation("sdpa")
        row_cache = cache if B == 1 else model(input_ids=prefix[:1], use_cache=True, logits_to_keep=1).past_key_values
        alone = model(input_ids=ids[:1, path], use_cache=True,  # positions: past + 0, 1, ...
                      **{CACHE_KW: row_cache}).logits.float()
        trim(row_cache)
        del row_cache
        mine = verify("packmask")[:1, path].float()
        err = ((mine - alone).norm() / alone.norm()).item()
        results.append(dict(batch=B, method="path_check_packmask_vs_path_alone", rel_err=err))
        if err > TOL:
            failures.append(f"batch {B}: the tree's path logits differ from the path run alone by {err:.2e}")
        del cache
        if DEV == "cuda":
            torch.cuda.empty_cache()

    env = dict(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu", torch=torch.__version__,
               transformers=transformers.__version__, packmask=packmask.__version__,
               date=time.strftime("%Y-%m-%d", time.gmtime()), model="TinyLlama-shaped 22 layers" if not SMALL else "tiny",
               fresh_mask=FRESH_MASK)
    print(f"\nspec_decode: {DRAFT}-token draft tree over a {PAST}-token cache; {env}")
    print(f"{'batch':>5} {'method':<22} {'ms':>8} {'x sdpa':>7} {'peak MiB':>9} {'rel err':>9} {'host ms':>8} "
          f"{'GPU busy':>8} {'GPU attn':>8}")
    sdpa_ms = {r["batch"]: r.get("ms") for r in results if r["method"] == "sdpa_dense4d"}
    for r in results:
        if "ms" in r:
            speed = sdpa_ms[r["batch"]] / r["ms"] if sdpa_ms.get(r["batch"]) else float("nan")
            peak = f"{r['peak_extra_mib']:.0f}" if r.get("peak_extra_mib") is not None else "-"
            where = "".join(f" {r[k]:>8.2f}" if k in r else f" {'-':>8}" for k in ("host_ms", "gpu_busy_ms",
                                                                                     "gpu_attention_ms"))
            print(f"{r['batch']:>5} {r['method']:<22} {r['ms']:>8.2f} {speed:>7.2f} {peak:>9} {r['rel_err_vs_sdpa']:>9.1e}"
                  f"{where}")
        elif "rel_err" in r:
            print(f"{r['batch']:>5} {r['method']:<40} {r['rel_err']:>9.1e}")
        else:
            print(f"{r['batch']:>5} {r['method']:<22} {r.get('refused') or r.get('error')}")
    finish("spec_decode", dict(env=env, results=results, failures=failures), failures)


if __name__ == "__main__":
    main()
