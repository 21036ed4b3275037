"""Train-step benchmark: packmask beside transformers' own packing paths, one run, same data.

Reference rows: padding, transformers' packing via position_ids with sdpa / flex (and sdpa with
``use_cache`` left at its default, transformers' pitfall), a dense 4D mask, plain causal attention
over packed rows (a deliberately contaminated control) and torch's varlen kernel as a 20-line custom
attention (``varlen_probe``, registered when the script runs). packmask rows:

  packmask_collator      DataCollatorWithFlattening keys (position_ids + cu_seq_lens), auto backend
  packmask_posids        packed position_ids only, use_cache left at its default (HF's pitfall)
  packmask_mask3d        a [B, N, N] bool mask, positions derived (mask built each step, counted)
  packmask_flex          collator keys forced through flex attention (BlockMask from offsets)

Real (non-pad) tokens/s, step time, peak memory and a contamination check (first packed row's
logits vs each document alone). Prints a table and writes JSON + PNG (``--out``). Exits 1 when a
check fails: a packmask row (or transformers' position_ids packing) differing from the documents
alone, or the contaminated control *not* differing (the check would be blind), or a method failing.
On CPU it shrinks to a smoke test.

    python benchmarks/train_step.py --dist sft --out results/      # GPU: 2 rows x 8192 tokens
    python benchmarks/train_step.py --methods pad_sdpa,packmask_collator   # CPU smoke test
"""
import argparse, json, math, os, sys, time, traceback
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, AttentionInterface
import packmask
from packmask import segments

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.bfloat16 if DEV == "cuda" else torch.float32
SMALL = DEV == "cpu"
ARGS = None  # set by cli()
ROW = 256
ROWS = 2
STEPS = 2
WARM = 1 if SMALL else 3
g = torch.Generator().manual_seed(0)


def lengths(n, median, sigma, cap):
    x = torch.exp(torch.randn(n, generator=g) * sigma + math.log(median))
    return x.clamp(8, cap).long().tolist()


def pack_ffd(lens, cap):
    """First-fit decreasing (simple reference; bins as lists of indices)."""
    order = sorted(range(len(lens)), key=lambda i: -lens[i])
    bins, free = [], []
    for i in order:
        for b in range(len(bins)):
            if free[b] >= lens[i]:
                bins[b].append(i); free[b] -= lens[i]; break
        else:
            bins.append([i]); free.append(cap - lens[i])
    return bins


def varlen_attention(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kw):
    from torch.nn.attention.varlen import varlen_attn
    B, H, N, D = q.shape
    cu = kw["cu_seq_lens_q"]; mx = kw["max_length_q"]
    qf = q.transpose(1, 2).reshape(B * N, H, D)
    kf = k.transpose(1, 2).reshape(B * N, k.shape[1], D)
    vf = v.transpose(1, 2).reshape(B * N, v.shape[1], D)
    if kf.shape[1] != H:  # older torch varlen has no enable_gqa
        kf = kf.repeat_interleave(H // kf.shape[1], dim=1); vf = vf.repeat_interleave(H // vf.shape[1], dim=1)
    out = varlen_attn(qf, kf, vf, cu, cu, mx, mx, scale=scaling, window_size=(-1, 0))
    return out.reshape(B, N, H, D), None




def make_model(impl):
    cfg = LlamaConfig(vocab_size=32000, hidden_size=256 if SMALL else 2048,
                      intermediate_size=512 if SMALL else 5632,
                      num_hidden_layers=2 if SMALL else 8, num_attention_heads=4 if SMALL else 32,
                      num_key_value_heads=2 if SMALL else 4, max_position_embeddings=ROW,
                      attn_implementation=impl)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(DEV, DT)


def _compiled_graphs():
    """Graphs torch.compile has produced so far (a recompile per batch would show up here)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def layout_ms(make_step_inputs, reps=5):
    """Host+device time to turn one step's inputs into packmask's layout (the once-per-forward
    analysis), to compare with the step time."""
    from packmask.layout import DocumentLayout, analyse_mask
    times = []
    for r in range(reps):
        kwargs, _, _ = make_step_inputs(r)
        ids = kwargs["input_ids"]
        if DEV == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        if "attention_mask" in kwargs:
            analyse_mask(kwargs["attention_mask"], *ids.shape)
        elif "cu_seq_lens_q" in kwargs:
            DocumentLayout.from_cu_seqlens(kwargs["cu_seq_lens_q"], *ids.shape)
        else:
            DocumentLayout.from_position_ids(kwargs["position_ids"])
        if DEV == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def timed(fn, steps, warm):
    for _ in range(warm):
        fn()
    if DEV == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    if DEV == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / max(steps, 1)
    mem = torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else 0
    return dt, mem


def main():
    AttentionInterface.register("varlen_probe", varlen_attention)
    print("torch", torch.__version__, "transformers", transformers.__version__, DEV,
          torch.cuda.get_device_name() if DEV == "cuda" else "")
    dist = ARGS.dist
    med, sig = (400, 1.0) if dist == "sft" else (1500, 1.2)
    lens = lengths(4000, med if not SMALL else 40, sig, ROW)
    bins = pack_ffd(lens, ROW)
    import random
    random.Random(0).shuffle(bins)  # FFD emits big documents first; train in random row order
    fill = sum(lens) / (len(bins) * ROW)
    print(f"dist={dist} docs={len(lens)} mean_len={sum(lens)/len(lens):.0f} rows={len(bins)} fill={fill:.4f}")
    results = {}
    batches_packed = [bins[i:i + ROWS] for i in range(0, len(bins) - ROWS + 1, ROWS)]
    V = 32000

    def packed_inputs_segs(bi):
        rows = batches_packed[bi % len(batches_packed)]
        segs = []
        for r in rows:
            rl = [lens[i] for i in r]
            if sum(rl) < ROW:
                rl = rl + [ROW - sum(rl)]
            segs.append(rl)
        return segs

    def packed_inputs(bi):
        rows = batches_packed[bi % len(batches_packed)]
        pos = []; segs = []
        for r in rows:
            rl = [lens[i] for i in r]
            if sum(rl) < ROW:
                rl = rl + [ROW - sum(rl)]  # tail pad as its own segment
            segs.append(rl)
            pos.append(torch.cat([torch.arange(l) for l in rl]))
        real = sum(sum(lens[i] for i in r) for r in rows)
        ids = torch.randint(0, V, (len(rows), ROW), generator=torch.Generator().manual_seed(bi))
        return ids.to(DEV), torch.stack(pos).to(DEV), segs, real

    # padding baseline: random order, batches grown while batch_size * longest <= ROWS * ROW tokens
    pad_batches, cur = [], []
    for i in range(len(lens)):
        if cur and (len(cur) + 1) * max(max(lens[j] for j in cur), lens[i]) > ROWS * ROW:
            pad_batches.append(cur); cur = []
        cur.append(i)

    def padded_inputs(bi, bs):
        idx = pad_batches[bi % len(pad_batches)]
        bs = len(idx)
        L = max(lens[i] for i in idx)
        ids = torch.randint(0, V, (bs, L), generator=g)
        am = torch.zeros(bs, L, dtype=torch.long)
        for j, i in enumerate(idx):
            am[j, :lens[i]] = 1
        return ids.to(DEV), am.to(DEV), sum(lens[i] for i in idx), bs * L

    ref_cache = {}
    CHECK_BI = next(i for i, b in enumerate(batches_packed) if 4 <= len(b[0]) <= 12)
    print("contamination check on a row of", len(batches_packed[CHECK_BI][0]), "documents")

    def contamination(model, make_step_inputs, use_cache):
        # compare the first row's logits with each document run on its own (sdpa, no packing)
        kwargs, _, _ = make_step_inputs(CHECK_BI)
        with torch.no_grad():
            out = model(**kwargs, use_cache=use_cache).logits[0].float()
            if "ref" not in ref_cache:
                ref = make_model("sdpa")
                ids = kwargs["input_ids"][0]
                segs = packed_inputs_segs(CHECK_BI)[0]
                parts, s = [], 0
                for l in segs[:-1] if sum(lens[i] for i in batches_packed[CHECK_BI][0]) < ROW else segs:
                    parts.append(ref(input_ids=ids[s:s + l][None], use_cache=False).logits[0].float()); s += l
                ref_cache["ref"] = torch.cat(parts); ref_cache["n"] = s
                del ref
            r = ref_cache["ref"]; n = ref_cache["n"]
            return ((out[:n] - r).norm() / r.norm()).item()

    def run(name, impl, make_step_inputs, use_cache=False):
        try:
            model = make_model(impl)
            err = contamination(model, make_step_inputs, use_cache) if ("packed" in name or name.startswith("packmask")) else float("nan")
            counter = {"i": 0, "real": 0, "tot": 0}

            def step():
                kwargs, real, tot = make_step_inputs(counter["i"])
                counter["i"] += 1; counter["real"] += real; counter["tot"] += tot
                out = model(**kwargs, use_cache=use_cache)
                out.loss.backward()
            # count only timed tokens
            timed(step, 0, WARM)
            counter.update(real=0, tot=0)
            graphs_before = _compiled_graphs()
            dt, mem = timed(step, STEPS, 0)
            tps = counter["real"] / (dt * STEPS)
            results[name] = dict(tok_s=tps, step_s=dt, mem_gib=mem, pad_frac=1 - counter["real"] / counter["tot"], rel_err_vs_unpacked=err,
                                 graphs_compiled_while_timed=_compiled_graphs() - graphs_before)
            if name.startswith("packmask"):
                results[name]["layout_ms"] = layout_ms(make_step_inputs)
            print(f"{name:34s} real_tok/s={tps:10.0f} step={dt*1e3:7.1f}ms peak={mem:5.1f}GiB pad={results[name]['pad_frac']:.3f} err_vs_unpacked={err:.2e}", flush=True)
            del model
        except Exception as e:
            results[name] = dict(error=repr(e)[:300])
            print(f"{name:28s} FAILED {repr(e)[:300]}", flush=True)
            traceback.print_exc(limit=3)
        if DEV == "cuda":
            torch.cuda.empty_cache()

    def pk_posids(i):
        ids, pos, segs, real = packed_inputs(i)
        return dict(input_ids=ids, position_ids=pos, labels=ids), real, ids.numel()

    def pk_nomask(i):
        ids, pos, segs, real = packed_inputs(i)
        return dict(input_ids=ids, labels=ids), real, ids.numel()

    def pk_dense4d(i):
        ids, pos, segs, real = packed_inputs(i)
        B = ids.shape[0]
        m = torch.zeros(B, 1, ROW, ROW, dtype=torch.bool, device=DEV)
        for b, rl in enumerate(segs):
            s = 0
            for l in rl:
                m[b, 0, s:s + l, s:s + l] = torch.ones(l, l, dtype=torch.bool, device=DEV).tril()
                s += l
        return dict(input_ids=ids, position_ids=pos, attention_mask=m, labels=ids), real, ids.numel()

    def pk_varlen(i):
        ids, pos, segs, real = packed_inputs(i)
        flat = [l for rl in segs for l in rl]
        cu = segments.cu_seqlens_from_lengths(torch.tensor(flat)).to(DEV)
        return dict(input_ids=ids, position_ids=pos, labels=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                    max_length_q=max(flat), max_length_k=max(flat)), real, ids.numel()

    def pm_mask3d(i):
        ids, pos, segs, real = packed_inputs(i)
        mask = packmask.block_diagonal_mask(segs, ROW, device=DEV)
        return dict(input_ids=ids, attention_mask=mask, labels=ids), real, ids.numel()

    bs_pad = 2

    def pad(i):
        ids, am, real, tot = padded_inputs(i, bs_pad)
        labels = ids.masked_fill(am == 0, -100)
        return dict(input_ids=ids, attention_mask=am, labels=labels), real, tot

    which = ARGS.methods.split(",")
    table = {
        "pad_sdpa": ("sdpa", pad),
        "packed_causal_nomask_sdpa": ("sdpa", pk_nomask),
        "packed_posids_sdpa": ("sdpa", pk_posids),
        "packed_dense4d_sdpa": ("sdpa", pk_dense4d),
        "packed_posids_flex": ("flex_attention", pk_posids),
        "packed_varlen": ("varlen_probe", pk_varlen),
        "packed_posids_eager": ("eager", pk_posids),
        "packmask_collator": ("packmask", pk_varlen),
        "packmask_mask3d": ("packmask", pm_mask3d),
    }
    for name in which:
        if DEV != "cuda" and name in GPU_ONLY:
            print(f"skipped {name}: needs CUDA ({DEV} here)")
            continue
        if name in table:
            run(name, *table[name])
        if name == "packed_posids_sdpa_usecache_default":
            run(name, "sdpa", pk_posids, use_cache=None)
        if name == "packmask_posids":  # use_cache left at its default: packmask stays isolated
            run(name, "packmask", pk_posids, use_cache=None)
        if name == "packmask_flex":
            with packmask.backend("flex"):
                run(name, "packmask", pk_varlen)
    out = ARGS.out
    env = dict(torch=torch.__version__, transformers=transformers.__version__, packmask=packmask.__version__,
               device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu", date=time.strftime("%Y-%m-%d"),
               dist=dist, fill=fill, row=ROW, rows=ROWS, steps=STEPS)
    print_table(results, env)
    failures = check_results(results)
    for failure in failures:
        print("CHECK FAILED:", failure)
    if out:
        os.makedirs(out, exist_ok=True)
        json.dump(dict(env=env, results=results, failures=failures),
                  open(os.path.join(out, f"train_step_{dist}.json"), "w"), indent=1)
        plot(results, env, os.path.join(out, f"train_step_{dist}.png"))
    return 1 if failures else 0


# methods that must equal the documents run alone, and the control that must not
ISOLATED = ("packmask_collator", "packmask_posids", "packmask_mask3d", "packmask_flex", "packed_posids_sdpa",
            "packed_varlen", "packed_dense4d_sdpa", "packed_posids_flex")
CONTAMINATED = ("packed_causal_nomask_sdpa",)


def check_results(results):
    """Failure messages: a run that crashed, an isolated method off by more than the tolerance, a
    contaminated control within it (then the check could not tell the two apart)."""
    tol = 5e-2 if DEV == "cuda" else 1e-4  # bf16 on GPU, fp32 on CPU
    failures = []
    for name, r in results.items():
        if "error" in r:
            failures.append(f"{name} failed: {r['error'][:200]}")
        elif name in ISOLATED and not r["rel_err_vs_unpacked"] <= tol:
            failures.append(f"{name}: rel err vs alone {r['rel_err_vs_unpacked']:.2e} > {tol:g}")
        elif name in CONTAMINATED and not r["rel_err_vs_unpacked"] > 1e-2:
            failures.append(f"{name}: the contaminated control is within {r['rel_err_vs_unpacked']:.2e} of the "
                            "documents alone; the check cannot tell isolation from contamination")
    return failures


def print_table(results, env):
    from rich.console import Console
    from rich.table import Table
    base = results.get("packed_posids_sdpa", {}).get("tok_s")
    t = Table(title=f"train step, {env['device']}, DIST={env['dist']}, torch {env['torch']}, transformers {env['transformers']}")
    for c in ("method", "real tok/s", "vs HF sdpa packing", "step ms", "peak GiB", "rel.err vs alone", "layout ms", "recompiles"):
        t.add_column(c, justify="right" if c != "method" else "left")
    for name, r in results.items():
        if "error" in r:
            t.add_row(name, "FAILED", r["error"][:60], "", "", "", "", "")
            continue
        ratio = f"{r['tok_s'] / base:.2f}x" if base else "-"
        t.add_row(name, f"{r['tok_s']:,.0f}", ratio, f"{r['step_s'] * 1e3:.1f}", f"{r['mem_gib']:.2f}",
                  f"{r['rel_err_vs_unpacked']:.3g}", f"{r['layout_ms']:.2f}" if "layout_ms" in r else "",
                  str(r.get("graphs_compiled_while_timed", "")))
    Console(width=140).print(t)


def plot(results, env, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n, r in results.items() if "tok_s" in r]
    vals = [results[n]["tok_s"] / 1e3 for n in names]
    colors = ["tab:green" if n.startswith("packmask") else ("tab:red" if results[n]["rel_err_vs_unpacked"] > 0.1 else "tab:gray") for n in names]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.5))
    ax.barh(names, vals, color=colors)
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:.1f}k", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("real tokens/s (thousands), forward+backward")
    ax.set_title(f"{env['device']} | DIST={env['dist']} | torch {env['torch']} | transformers {env['transformers']}\n"
                 "green: packmask, red: contaminated, gray: transformers' paths", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


GPU_ONLY = ("packed_posids_flex", "packed_varlen", "packmask_flex")  # flex has no CPU backward; varlen is CUDA
ALL_METHODS = ("pad_sdpa,packed_causal_nomask_sdpa,packed_posids_sdpa_usecache_default,packed_posids_sdpa,"
               "packed_dense4d_sdpa,packed_posids_flex,packed_varlen,packmask_collator,packmask_posids,"
               "packmask_mask3d,packmask_flex")


def cli(argv=None):
    global ARGS, ROW, STEPS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dist", choices=("sft", "long"), default="sft", help="document length distribution")
    parser.add_argument("--methods", default=ALL_METHODS, help="comma-separated methods (default: all)")
    parser.add_argument("--row", type=int, default=8192, help="tokens per packed row on GPU (CPU: 256)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps on GPU (CPU: 2)")
    parser.add_argument("--out", help="folder for train_step_<dist>.json / .png")
    ARGS = parser.parse_args(argv)
    if not SMALL:
        ROW, STEPS = ARGS.row, ARGS.steps
    return main()


if __name__ == "__main__":
    sys.exit(cli())
