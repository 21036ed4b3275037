"""Host overhead of packmask on draft-tree verification, against transformers' sdpa (CPU, same run).

    python benchmarks/decode_overhead.py          # OUT=dir to write $OUT/decode_overhead.json

Draft-tree verification of a small model is host-bound (spec_decode.py: the dense-mask forward takes
the same time at batch 1 and 8), so what packmask adds on the host is what it costs. Tiny tensors
(hidden 64, head dim 16), so the kernels are cheap and the Python around them shows:

  per layer     one attention call with the forward's layout already analysed (what layers 2..L pay):
                transformers' "sdpa" function vs packmask_attention (auto) with the same mask, calls
                interleaved, medians; packmask's host time (its call minus the bare sdpa call it makes);
                and the first layer's extra time (a new mask: analysed, route chosen)
  per forward   analysing a new [B, 1, N, past + N] mask (once per forward), and host syncs counted by
                packmask.host_syncs (per forward, and per layer: must be 0)
  kernel        sdpa with the kv heads read in place (enable_gqa) and the additive mask (what packmask runs on
                CPU) vs the bool mask vs repeat_kv (what transformers' sdpa runs), TinyLlama's 32 / 4 heads
  forward       the whole tiny model (LAYERS layers), a new mask every call as in a decoding loop

Checks (exit 1): packmask's logits equal sdpa's (fp32, rel err <= 1e-5); no host sync per layer.
"""
import os
import statistics
import sys
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import packmask
from _report import finish
from spec_decode import draft_parents  # the same draft tree as the end-to-end benchmark
from packmask.backends import AttentionSpec, choose_backend
from packmask.host_syncs import count_host_syncs
from packmask.inputs import layout_from_mask
from packmask.integration import packmask_attention

LAYERS = int(os.environ.get("LAYERS", 22))
PAST = int(os.environ.get("PAST", 256))
DRAFT = 64
BATCH = int(os.environ.get("BATCH", 1))
REPS = int(os.environ.get("REPS", 300))


def per_call_us(fn, reps=REPS, rounds=5):
    """Median over ``rounds`` of the mean µs per call (after a warm-up)."""
    for _ in range(20):
        fn()
    means = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        means.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(means)


def interleaved_us(fns: dict, reps=REPS) -> dict:
    """Median µs per call of each function, calls interleaved (A B A B ...): drifts of a shared CPU hit all alike."""
    times = {name: [] for name in fns}
    for _ in range(10):
        for fn in fns.values():
            fn()
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def main():
    torch.set_num_threads(1)  # host overhead, not CPU kernels racing over cores
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=PAST + 2 * DRAFT,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    mask, pos = packmask.tree_mask(draft_parents().expand(BATCH, -1), PAST)
    mask4 = mask[:, None]
    failures, rows = [], {}

    # ---- per layer ------------------------------------------------------------------------------
    attn = model.model.layers[0].self_attn
    D = cfg.hidden_size // cfg.num_attention_heads
    q = torch.randn(BATCH, cfg.num_attention_heads, DRAFT, D)
    k = torch.randn(BATCH, cfg.num_key_value_heads, PAST + DRAFT, D)
    v = torch.randn_like(k)
    sdpa_fn = ALL_ATTENTION_FUNCTIONS["sdpa"]
    plain = lambda: sdpa_fn(attn, q, k, v, mask4, scaling=D ** -0.5)  # noqa: E731
    mine = lambda: packmask_attention(attn, q, k, v, mask4, scaling=D ** -0.5)  # noqa: E731
    err = rel_err(mine()[0], plain()[0])
    if err > 1e-5:
        failures.append(f"packmask_attention differs from transformers' sdpa by {err:.1e}")
    layout = layout_from_mask(mask4, BATCH, DRAFT)
    spec = AttentionSpec(scale=D ** -0.5)
    choice = lambda: choose_backend(layout, spec, q, False, "auto", LAYERS)  # noqa: E731
    fresh = lambda: mask.clone()[:, None]  # noqa: E731 — a new mask, as every step of a decoding loop has
    first = lambda: packmask_attention(attn, q, k, v, fresh(), scaling=D ** -0.5)  # noqa: E731
    plain_fresh = lambda: sdpa_fn(attn, q, k, v, fresh(), scaling=D ** -0.5)  # noqa: E731
    import torch.nn.functional as F
    additive = torch.zeros(mask4.shape).masked_fill(~mask4, float("-inf"))  # the form packmask hands sdpa
    bare = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=D ** -0.5,  # noqa: E731
                                                  enable_gqa=True)
    t = interleaved_us(dict(sdpa=plain, packmask=mine, bare_kernel=bare, sdpa_new_mask=plain_fresh,
                            packmask_new_mask=first))
    sdpa_us, pm_us = t["sdpa"], t["packmask"]
    with count_host_syncs() as layer_syncs:
        mine()
    rows["per_layer"] = dict(sdpa_us=sdpa_us, packmask_us=pm_us, overhead_us=pm_us - sdpa_us, ratio=pm_us / sdpa_us,
                             host_us=pm_us - t["bare_kernel"], bare_kernel_us=t["bare_kernel"],
                             first_layer_overhead_us=t["packmask_new_mask"] - t["sdpa_new_mask"],
                             uncached_choice_us=per_call_us(choice), host_syncs=sum(layer_syncs.values()),
                             rel_err=err)
    if layer_syncs:
        failures.append(f"packmask syncs the device {dict(layer_syncs)} in every layer")

    # ---- the kernel: shared kv heads read in place vs repeat_kv (TinyLlama's 32 / 4 heads, head dim 64) --------
    qt = torch.randn(BATCH, 32, DRAFT, 64)
    kt, vt = torch.randn(BATCH, 4, PAST + DRAFT, 64), torch.randn(BATCH, 4, PAST + DRAFT, 64)
    additive_t = torch.zeros(mask4.shape).masked_fill(~mask4, float("-inf"))
    kernels = dict(  # packmask's call (additive mask built once per forward), then what sdpa runs on a bool mask
        packmask=lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=additive_t, enable_gqa=True),
        in_place_bool_mask=lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask4, enable_gqa=True),
        transformers_repeat_kv=lambda: F.scaled_dot_product_attention(
            qt, kt.repeat_interleave(8, 1), vt.repeat_interleave(8, 1), attn_mask=mask4))
    g = interleaved_us(kernels, reps=max(20, REPS // 10))
    rows["gqa_kernel"] = dict(heads=32, kv_heads=4, head_dim=64, **{f"{k}_us": us for k, us in g.items()},
                              speed=g["transformers_repeat_kv"] / g["packmask"])

    # ---- per forward: a new mask --------------------------------------------------------------------
    clone_us = per_call_us(fresh, reps=50)
    analyse_us = per_call_us(lambda: layout_from_mask(fresh(), BATCH, DRAFT), reps=50) - clone_us

    # ---- whole forward -------------------------------------------------------------------------------
    prefix = torch.randint(1, 1000, (BATCH, PAST))
    cache = model(input_ids=prefix, use_cache=True, logits_to_keep=1).past_key_values
    ids = torch.randint(1, 1000, (BATCH, DRAFT))
    cache_kw = "cache" if "cache" in LlamaForCausalLM.forward.__code__.co_varnames else "past_key_values"

    def verify(impl):
        model.set_attn_implementation(impl)
        try:
            return model(input_ids=ids, attention_mask=fresh(), position_ids=pos, use_cache=True,
                         **{cache_kw: cache}).logits
        finally:
            for layer in cache.layers:
                if layer.get_seq_length() > PAST:
                    layer.crop(PAST - layer.get_seq_length())

    ref, got = verify("sdpa"), verify("packmask")
    err = rel_err(got, ref)
    if err > 1e-5:
        failures.append(f"packmask's forward differs from sdpa's by {err:.1e}")
    with count_host_syncs() as fwd_syncs:
        verify("packmask")
    times = {impl: us / 1e3 for impl, us in interleaved_us(
        {impl: (lambda impl=impl: verify(impl)) for impl in ("sdpa", "packmask")}, reps=100).items()}
    rows["forward"] = dict(layers=LAYERS, sdpa_ms=times["sdpa"], packmask_ms=times["packmask"],
                           speed_vs_sdpa=times["sdpa"] / times["packmask"], rel_err=err,
                           host_syncs=sum(fwd_syncs.values()), syncs_by_call=dict(fwd_syncs),
                           mask_analysis_us=analyse_us)

    env = dict(device="cpu", torch=torch.__version__, transformers=transformers.__version__,
               packmask=packmask.__version__, date=time.strftime("%Y-%m-%d", time.gmtime()),
               batch=BATCH, past=PAST, draft=DRAFT, python=sys.version.split()[0])
    r, f = rows["per_layer"], rows["forward"]
    print(f"\ndecode_overhead: {DRAFT}-token draft tree over {PAST} cached tokens, batch {BATCH}; {env}")
    print(f"per layer   sdpa {r['sdpa_us']:7.1f} us   packmask {r['packmask_us']:7.1f} us   difference "
          f"{r['overhead_us']:+6.1f} us ({r['ratio']:.2f}x)   host syncs {r['host_syncs']}\n"
          f"            packmask's host time around its sdpa call {r['host_us']:+6.1f} us (the bare call: "
          f"{r['bare_kernel_us']:.1f} us)\n"
          f"first layer overhead {r['first_layer_overhead_us']:+7.1f} us (a new mask: analysed, route chosen)   "
          f"dispatcher choice alone {r['uncached_choice_us']:.1f} us")
    g = rows["gqa_kernel"]
    print(f"kernel      32/4 heads, dim 64: packmask (kv heads in place, additive mask) {g['packmask_us']:.0f} us, "
          f"in place with the bool mask {g['in_place_bool_mask_us']:.0f} us, transformers (repeat_kv, bool mask) "
          f"{g['transformers_repeat_kv_us']:.0f} us ({g['speed']:.2f}x)")
    print(f"per forward mask analysis {f['mask_analysis_us']:7.1f} us   host syncs {f['host_syncs']} {f['syncs_by_call']}")
    print(f"forward     {LAYERS} layers: sdpa {f['sdpa_ms']:.2f} ms   packmask {f['packmask_ms']:.2f} ms   "
          f"{f['speed_vs_sdpa']:.2f}x sdpa   rel err {f['rel_err']:.1e}")
    finish("decode_overhead", dict(env=env, results=rows, failures=failures), failures)


if __name__ == "__main__":
    main()
