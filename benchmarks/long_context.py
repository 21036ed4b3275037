"""Long-context training step: 1 row x 65,536 tokens, documents of median ~4000 tokens.

TinyLlama-shaped model with 8 layers (hidden 2048, 32/4 heads of dim 64, MLP 5632, vocab 32000),
bf16, forward + backward of the causal-LM loss, every method in the same run on the same rows:

* ``packmask_cudnn`` / ``packmask_varlen`` / ``packmask_auto``: ``attn_implementation="packmask"``
  with the kernel forced (``packmask.backend(...)``) or chosen by the dispatcher;
* ``packmask_auto_compiled``: the same under ``torch.compile(model)``, other document splits every
  step (recompiles are counted);
* ``plain_causal``: sdpa over the whole row, positions 0..N-1 (contaminated: documents see each other);
* ``sdpa_dense_mask``: transformers' sdpa with a dense [1, 1, N, N] mask (correct; slow / may not fit).

Reported: tokens/s, step ms, peak memory, speed-up vs plain causal and vs packmask varlen, and
the attention share of the step (attention forward+backward alone, 8 layers, over the step).
Correctness: the first documents' logits from packmask (each kernel, eager and compiled) against
the same documents run alone; must be within the bf16 noise (rel. err < 0.05) while the plain
causal run must be contaminated (> 0.05). Exits 1 if a check fails. Writes $OUT/long_context.json.

    OUT=out python benchmarks/long_context.py       # env: STEPS, METHODS, CHECKPOINT=0|1, ROW

Without CUDA it shrinks to a smoke run (tiny model, 512 tokens, fp32, aot_eager) of the same code.

Activation checkpointing is on by default for every method alike (CHECKPOINT=0 turns it off): without
it the 65,536-token step does not fit in 80 GB (the fp32 logits of the loss alone are 7.8 GiB;
measured on an H100: every method ran out of memory). The attention share then understates the
attention work slightly (checkpointing runs each layer's attention forward twice).
"""
import json
import math
import os
import sys
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import packmask
from packmask import segments

SMOKE = not torch.cuda.is_available()  # on a CPU machine: a tiny smoke run of the same code path
DEV = "cpu" if SMOKE else "cuda"
DT = torch.float32 if SMOKE else torch.bfloat16
ROW = int(os.environ.get("ROW", 512 if SMOKE else 65536))
STEPS = int(os.environ.get("STEPS", 2 if SMOKE else 4))
MEDIAN = 64 if SMOKE else 4000
SHAPE = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=256) if SMOKE else
         dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=4,
              vocab_size=32000))
METHODS = os.environ.get("METHODS", "packmask_cudnn,packmask_varlen,packmask_auto,packmask_auto_compiled,"
                         "plain_causal,sdpa_dense_mask").split(",")
COMPILE = dict(backend="aot_eager") if SMOKE else {}  # the CPU smoke run traces without code generation


def lengths(total, median, seed, sigma=1.0):
    """Lognormal document lengths filling exactly ``total`` tokens (the last one is cut)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    while sum(out) < total:
        x = int(math.exp(torch.randn(1, generator=g).item() * sigma + math.log(median)))
        out.append(min(max(16, x), total - sum(out)))
    return out


def make_model(impl):
    cfg = LlamaConfig(**SHAPE, max_position_embeddings=ROW, attn_implementation=impl)
    torch.manual_seed(0)
    with torch.device(DEV):
        model = LlamaForCausalLM(cfg).to(DT).train()
    if os.environ.get("CHECKPOINT", "1") == "1":
        model.gradient_checkpointing_enable()
    return model


def batch(step):
    """input_ids, packed position_ids, labels (-100 at document starts) for step ``step``."""
    lens = lengths(ROW, MEDIAN, seed=step)
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, ROW), generator=g)
    starts = segments.starts_from_lengths([lens], ROW)
    pos = segments.position_ids_from_starts(starts)
    labels = ids.clone()
    labels[starts] = -100
    return lens, ids.to(DEV), pos.to(DEV), labels.to(DEV)


def step_fn(model, method, inputs):
    _, ids, pos, labels = inputs
    if method == "plain_causal":
        kw = dict(input_ids=ids, labels=labels)
    elif method == "sdpa_dense_mask":
        doc = segments.doc_ids_from_starts(segments.starts_from_position_ids(pos), local=True)  # the restart rule
        mask = (doc[:, :, None] == doc[:, None, :]).tril()[:, None]
        kw = dict(input_ids=ids, position_ids=pos, attention_mask=mask, labels=labels)
    else:
        kw = dict(input_ids=ids, position_ids=pos, labels=labels)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(**kw, use_cache=False)
        out.loss.backward()
        return out.loss.detach()
    return run


def forced(method):
    return {"packmask_cudnn": "cudnn", "packmask_varlen": "varlen"}.get(method, "auto")


def time_method(method, model, steps):
    runner = model
    if method.endswith("_compiled"):
        runner = torch.compile(model, **COMPILE)
    from torch._dynamo.utils import counters
    with packmask.backend(forced(method)):
        warm = [batch(100 + i) for i in range(2)]
        t0 = time.perf_counter()
        for b in warm:
            step_fn(runner, method, b)()
        _sync()
        warm_s = time.perf_counter() - t0
        graphs_after_warmup = int(counters["stats"]["unique_graphs"])
        if not SMOKE:
            torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        for i in range(steps):
            b = batch(i)  # a different document split every step
            run = step_fn(runner, method, b)
            _sync()
            t = time.perf_counter()
            losses.append(run().item())
            _sync()
            times.append((time.perf_counter() - t) * 1e3)
        recompiles = int(counters["stats"]["unique_graphs"]) - graphs_after_warmup
    ms = sorted(times)[len(times) // 2]
    peak = 0.0 if SMOKE else torch.cuda.max_memory_allocated() / 2**30
    return dict(step_ms=ms, tokens_per_s=ROW / ms * 1e3, peak_gib=peak,
                warmup_s=warm_s, losses=losses, new_graphs_after_warmup=recompiles if runner is not model else None)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def alone_error(model, method, docs=3):
    """Logits of the first ``docs`` documents of step 0's row vs each run alone (bf16 sdpa)."""
    lens, ids, pos, labels = batch(0)
    runner = torch.compile(model, **COMPILE) if method.endswith("_compiled") else model
    with torch.no_grad(), packmask.backend(forced(method)):
        kw = dict(input_ids=ids) if method == "plain_causal" else dict(input_ids=ids, position_ids=pos)
        packed = runner(**kw, use_cache=False).logits[0]
    errs, s = [], 0
    with torch.no_grad():
        for n in lens[:docs]:
            with packmask.backend("auto"):
                alone = model(input_ids=ids[:, s:s + n], use_cache=False).logits[0]
            errs.append(rel(packed[s:s + n], alone))
            s += n
    return max(errs)


def attention_ms(layout_lens, layers=8, backend_name="auto"):
    """Attention forward+backward alone for the model's shape, summed over its layers."""
    from packmask.backends import AttentionSpec, attend
    from packmask.layout import DocumentLayout
    H, Hkv = SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"]
    D = SHAPE["hidden_size"] // H
    layout = DocumentLayout.from_seq_lengths([layout_lens], ROW, device=DEV)
    q = torch.randn(1, ROW, H, D, device=DEV, dtype=DT).transpose(1, 2).requires_grad_()
    k = torch.randn(1, ROW, Hkv, D, device=DEV, dtype=DT).transpose(1, 2).requires_grad_()
    v = torch.randn(1, ROW, Hkv, D, device=DEV, dtype=DT).transpose(1, 2).requires_grad_()
    do = torch.randn(1, ROW, H, D, device=DEV, dtype=DT)
    spec = AttentionSpec(scale=D ** -0.5)
    if backend_name == "plain":
        def step():
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(
                do.transpose(1, 2))
    else:
        def step():
            with packmask.backend(backend_name):
                attend(q, k, v, layout, spec, training=True).backward(do)
    if SMOKE:
        step()
        t = time.perf_counter()
        step()
        return layers * (time.perf_counter() - t) * 1e3
    import triton.testing
    return layers * triton.testing.do_bench(step, warmup=10, rep=50, return_mode="median")


def _sync():
    if not SMOKE:
        torch.cuda.synchronize()


def _write(env, results, errors, **extra):
    """Atomically (re)write $OUT/long_context.json with what is measured so far."""
    if not os.environ.get("OUT"):
        return
    path = os.path.join(os.environ["OUT"], "long_context.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(dict(env=env, results=results, err_vs_alone=errors, **extra), fh, indent=1)
    os.replace(path + ".tmp", path)


def main():
    env = dict(device="cpu (smoke)" if SMOKE else torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
               cudnn=torch.backends.cudnn.version(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               row=ROW, median=MEDIAN, steps=STEPS, checkpointing=os.environ.get("CHECKPOINT", "1") == "1")
    from packmask.backends import cudnn as cudnn_backend
    env["cudnn_frontend"] = getattr(cudnn_backend._frontend(), "__version__", None)
    lens0 = batch(0)[0]
    env["docs_step0"] = len(lens0)
    print(env, flush=True)
    results, errors = {}, {}
    models = {}
    for method in METHODS:
        impl = "sdpa" if method in ("plain_causal", "sdpa_dense_mask") else "packmask"
        if impl not in models:
            models[impl] = make_model(impl)
        model = models[impl]
        if method == "packmask_cudnn" and not cudnn_backend.available():
            results[method] = dict(skipped="cudnn backend not available")
            continue
        try:
            steps = 1 if method == "sdpa_dense_mask" else STEPS
            results[method] = time_method(method, model, steps)
            if method != "sdpa_dense_mask":
                errors[method] = alone_error(model, method)
        except torch.OutOfMemoryError as e:
            results[method] = dict(skipped=f"out of memory: {str(e)[:120]}")
        except packmask.PackmaskError as e:  # a forced kernel this machine cannot run (CPU smoke run)
            results[method] = dict(skipped=str(e)[:160])
        if not SMOKE:
            torch.cuda.empty_cache()
        _write(env, results, errors)
        r = results[method]
        print(f"{method:26s} " + (f"{r['step_ms']:9.1f} ms  {r['tokens_per_s'] / 1e3:7.1f}k tok/s  "
                                   f"{r['peak_gib']:5.1f} GiB  err-vs-alone {errors.get(method, float('nan')):.3g}"
                                   if "step_ms" in r else r["skipped"]), flush=True)
    from packmask.backends import choose_backend, AttentionSpec
    from packmask.layout import DocumentLayout
    H = SHAPE["num_attention_heads"]
    q = torch.empty(1, H, ROW, SHAPE["hidden_size"] // H, device=DEV, dtype=DT)
    auto = choose_backend(DocumentLayout.from_seq_lengths([lens0], ROW, device=DEV), AttentionSpec(scale=0.125), q, True)
    kernels = ("cudnn", "varlen", "plain") if not SMOKE else (auto, "plain")
    attn = {name: attention_ms(lens0, layers=SHAPE["num_hidden_layers"], backend_name=name) for name in kernels
            if name != "cudnn" or cudnn_backend.available()}
    plain = results.get("plain_causal", {}).get("step_ms")
    varlen = results.get("packmask_varlen", {}).get("step_ms")
    rows = []
    for method, r in results.items():
        if "step_ms" not in r:
            continue
        kernel = {"packmask_cudnn": "cudnn", "packmask_varlen": "varlen", "plain_causal": "plain"}.get(method, auto)
        r["attention_share"] = attn.get(kernel, float("nan")) / r["step_ms"] if kernel in attn else None
        r["x_plain_causal"] = plain / r["step_ms"] if plain else None
        r["x_packmask_varlen"] = varlen / r["step_ms"] if varlen else None
        r["err_vs_alone"] = errors.get(method)
        rows.append((method, r))
    print(f"\nauto choice: {auto}; attention fwd+bwd x{SHAPE['num_hidden_layers']} layers (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in attn.items()))
    print("| method | step ms | tok/s | peak GiB | x plain causal | x packmask varlen | attention share | err vs alone |")
    print("|---|---|---|---|---|---|---|---|")
    for method, r in rows:
        f = lambda x, fmt: "–" if x is None else format(x, fmt)  # noqa: E731
        print(f"| {method} | {r['step_ms']:.1f} | {r['tokens_per_s'] / 1e3:.1f}k | {r['peak_gib']:.1f} | "
              f"{f(r['x_plain_causal'], '.2f')} | {f(r['x_packmask_varlen'], '.2f')} | "
              f"{f(r['attention_share'], '.2f')} | {f(r['err_vs_alone'], '.3g')} |")
    measured = [e for m, e in errors.items() if m.startswith("packmask")]
    ok = bool(measured) and all(e < 0.05 for e in measured)  # nothing measured is a failure, not a pass
    contaminated = "plain_causal" in errors and errors["plain_causal"] > 0.05
    compiled = results.get("packmask_auto_compiled", {}).get("new_graphs_after_warmup")
    print(f"checks: packmask exact={ok} plain-causal contaminated={contaminated} compiled new graphs={compiled}")
    _write(env, results, errors, auto_choice=auto, attention_ms=attn)
    if not (ok and contaminated):
        print("CORRECTNESS CHECK FAILED")
        sys.exit(1)


if __name__ == "__main__":
    main()
