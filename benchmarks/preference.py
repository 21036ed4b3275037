"""Shared-prefix packing benchmark: DPO train step and GRPO log-prob pass, tree rows vs the alternatives.

    python benchmarks/preference.py --smoke            # CPU, shrunken (seconds)
    OUT=out python benchmarks/preference.py            # GPU: bf16, TinyLlama-shaped, 8 layers, 2 x 8192-token rows

Methods (each runs in the same process, same weights, same data):
  tree         packmask tree rows (prompt once, branches see prompt + themselves), [B,N,N] bool mask
  dup_varlen   packmask block-diagonal packing with the prompt duplicated ([P C][P R]), cu_seq_lens (varlen)
  trl_padded   TRL DPOTrainer's padded concatenated forward, reproduced here (TRL is not on the GPU image):
               rows [prompt+chosen]*E + [prompt+rejected]*E, right-padded to the longest, 2-D padding mask,
               sdpa; scored positions only (like TRL's fused LM head, which scores only label positions)
  pad_nomask   the same padded rows without a mask (right padding, plain causal): what a careful user can do
The tree rows also run forced onto each tree kernel: tree_triton (the one-launch Triton kernel) and
tree_varlen (the varlen decomposition); a kernel refused on this machine is reported as refused.
agentic: 8 rollouts x 4 turns forking at every turn (benchmarks/_agentic.py): tree vs every rollout
packed separately (paths_varlen) and every rollout a padded row (dense_padded).
GRPO (G completions of one prompt): tree, dup_varlen, and padded [prompt | completion] rows (left-padded
prompts, right-padded completions, 2-D mask, sdpa) as TRL's log-prob pass builds them.

DPO step = reference forward (no grad) + policy forward + backward of the sigmoid DPO loss. GRPO step =
policy forward + backward of the summed completion log-probs. Log-probs: every method projects only the
scored positions through the LM head. A correctness check compares per-branch log-prob sums of every
method on the same examples; the script exits 1 if they disagree.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import packmask
from packmask.data.spans import lengths_from_offsets
from packmask.data.tree import Forest, pack_forest
from packmask.data.tree_collator import collate_forest


def lognormal(rng, n, median, sigma, lo, hi):
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), lo, hi).astype(np.int64)


def make_model(impl, cfg, dev, dtype):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation=impl)).to(dev, dtype)


def branch_sums(model, kwargs, batch):
    """Per-branch summed log-probs, projecting only the predicting positions through the LM head."""
    hidden = model.model(**kwargs, use_cache=False).last_hidden_state
    rows = model.lm_head(hidden.flatten(0, 1).index_select(0, batch["logp_source"])).float()
    per_token = rows.gather(1, batch["logp_labels"][:, None])[:, 0] - torch.logsumexp(rows, -1)
    return per_token.new_zeros(batch["branch_length"].shape[0]).index_add(0, batch["logp_branch"], per_token)


# ---- inputs per method --------------------------------------------------------------------------------
def forest_of(examples, dup: bool):
    """examples: list of (prompt, [answer, ...]); tree or duplicated-prompt forest."""
    segs, parents, ex, kind = [], [], [], []
    for e, (p, answers) in enumerate(examples):
        local = 0
        for k, a in enumerate(answers):
            if dup or k == 0:
                segs.append(p); parents.append(-1); ex.append(e); kind.append(0)
                local += 1
            segs.append(a); parents.append(local - 1 if dup else 0); ex.append(e)
            local += 1
            kind.append(1 + k if len(answers) == 2 else 1)
    return Forest.from_segments(segs, parents, ex, kind, [k != 0 for k in kind])


def packed_batches(examples, row, rows_per_step, dup, dev):
    """Whole examples into rows (best-fit decreasing), ``rows_per_step`` rows per step."""
    return forest_batches(forest_of(examples, dup), row, rows_per_step, dup, dev)


def forest_batches(forest, row, rows_per_step, dup, dev):
    """A forest's examples into rows, ``rows_per_step`` rows per step; ``dup``: every root chain is one
    varlen document (cu_seq_lens), else the [B, N, N] tree mask."""
    packed = pack_forest(forest, row)
    out = []
    for r0 in range(0, packed.num_rows - rows_per_step + 1, rows_per_step):
        sub = _row_slice(packed, r0, r0 + rows_per_step)
        batch = collate_forest(sub, seq_len=row, return_mask=not dup, device=dev)
        kw = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
        if dup:   # documents = each root with its child; boundaries through packmask.segments
            from packmask.segments import cu_seqlens_from_starts, max_length, starts_from_lengths
            seg_rows = np.repeat(np.arange(sub.num_rows), lengths_from_offsets(sub.seg_row_offsets))
            roots = sub.seg_parent < 0
            # an example runs from its root to the next root (or the row's end); the padding rule adds the rest
            per_row = [lengths_from_offsets(np.append(sub.seg_start[roots & (seg_rows == r)], sub.row_lengths()[r]))
                       for r in range(sub.num_rows)]
            cu_t = cu_seqlens_from_starts(starts_from_lengths(per_row, row)).to(dev)
            mx = max_length(cu_t)
            kw.update(cu_seq_lens_q=cu_t, cu_seq_lens_k=cu_t, max_length_q=mx, max_length_k=mx)
        else:
            kw["attention_mask"] = batch["attention_mask"]
        n_ex = len(np.unique(sub.seg_example))
        batch["row_fill"] = float(sub.row_lengths().sum() / (rows_per_step * row))  # real tokens / slots
        out.append((kw, batch, n_ex))
    return out


def row_fill(batches):
    """Mean share of the timed rows' token slots holding real tokens (None for padded batches)."""
    fills = [b[1].get("row_fill") for b in batches if isinstance(b[1], dict)]
    return float(np.mean(fills)) if fills and None not in fills else None


def tree_rows(row, rows_per_step, tree_row):
    """``(row, rows per step)`` for the tree methods: ``tree_row`` tokens a row (0: ``row``), as many rows a
    step as keep the step's token slots equal to the other packed methods' (a tree larger than half a row
    leaves the rest of it empty: longer rows fit more of them)."""
    if not tree_row:
        return row, rows_per_step
    if (row * rows_per_step) % tree_row:
        raise SystemExit(f"--tree-row {tree_row} must divide a step's {row * rows_per_step} token slots")
    return tree_row, row * rows_per_step // tree_row


def _row_slice(packed, a, b):
    from packmask.data.tree import PackedForest
    s0, s1 = packed.seg_row_offsets[a], packed.seg_row_offsets[b]
    t0, t1 = packed.row_offsets[a], packed.row_offsets[b]
    return PackedForest(packed.tokens[t0:t1], packed.positions[t0:t1], packed.row_offsets[a:b + 1] - t0,
                        packed.seg_row_offsets[a:b + 1] - s0, packed.seg_start[s0:s1], packed.seg_length[s0:s1],
                        packed.seg_parent[s0:s1], packed.seg_example[s0:s1], packed.seg_kind[s0:s1],
                        packed.seg_scored[s0:s1])


def padded_batches(examples, per_step, dev, mask=True, left_pad_prompt=False):
    """TRL-style padded rows: one row per (prompt, answer), answers grouped by kind ([chosen..., rejected...])."""
    out = []
    for i in range(0, len(examples) - per_step + 1, per_step):
        chunk = examples[i:i + per_step]
        n_ans = len(chunk[0][1])
        pairs = [(p, ans[k], e, k) for k in range(n_ans) for e, (p, ans) in enumerate(chunk)] if n_ans == 2 else \
            [(p, a, e, k) for e, (p, ans) in enumerate(chunk) for k, a in enumerate(ans)]
        P = max(len(p) for p, *_ in pairs)
        if left_pad_prompt:   # GRPO: [left-padded prompt | right-padded completion]
            C = max(len(a) for _, a, *_ in pairs)
            L = P + C
            seqs = [[0] * (P - len(p)) + list(p) + list(a) + [0] * (C - len(a)) for p, a, *_ in pairs]
            am = [[0] * (P - len(p)) + [1] * (len(p) + len(a)) + [0] * (C - len(a)) for p, a, *_ in pairs]
            first = [P for _ in pairs]
        else:
            L = max(len(p) + len(a) for p, a, *_ in pairs)
            seqs = [list(p) + list(a) + [0] * (L - len(p) - len(a)) for p, a, *_ in pairs]
            am = [[1] * (len(p) + len(a)) + [0] * (L - len(p) - len(a)) for p, a, *_ in pairs]
            first = [len(p) for p, *_ in pairs]
        lens = np.array([len(a) for _, a, *_ in pairs])
        rows = np.repeat(np.arange(len(pairs)), lens)
        cols = np.concatenate([np.arange(f, f + n) for f, n in zip(first, lens)])
        ids = torch.tensor(seqs, device=dev)
        batch = dict(logp_source=torch.tensor(rows * L + cols - 1, device=dev),
                     logp_labels=ids.flatten()[torch.tensor(rows * L + cols, device=dev)],
                     logp_branch=torch.tensor(rows, device=dev), branch_length=torch.tensor(lens, device=dev))
        kw = dict(input_ids=ids)
        if mask:
            kw["attention_mask"] = torch.tensor(am, device=dev)
        out.append((kw, batch, len(chunk)))
    return out


# ---- steps ----------------------------------------------------------------------------------------
def dpo_step(policy, ref, kw, batch, beta=0.1):
    with torch.no_grad():
        ref_sums = branch_sums(ref, kw, batch)
    sums = branch_sums(policy, kw, batch)
    E = sums.shape[0] // 2
    delta = (sums[:E] - ref_sums[:E]) - (sums[E:] - ref_sums[E:])
    loss = -torch.nn.functional.logsigmoid(beta * delta).mean()
    loss.backward()
    return sums.detach()


def grpo_step(policy, ref, kw, batch):
    sums = branch_sums(policy, kw, batch)
    sums.sum().backward()
    return sums.detach()


def timed(step, batches, dev, warm, steps):
    """``(examples/s, s/step, peak GiB, first s)``: the first step of the method (its kernels' and the
    layout's warm-up) timed apart, then ``steps`` warm ones."""
    first = 0.0
    for i in range(warm):
        t = time.perf_counter()
        step(*batches[i % len(batches)][:2])
        if i == 0:
            if dev == "cuda":
                torch.cuda.synchronize()
            first = time.perf_counter() - t
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    n = 0
    for i in range(steps):
        kw, batch, n_ex = batches[(warm + i) % len(batches)]
        step(kw, batch)
        n += n_ex
    if dev == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0
    return n / dt, dt / steps, mem, first


def forced(name):
    return packmask.backend(name) if name != "auto" else contextlib.nullcontext()


def run_method(step, backend, batches, dev, warm, steps):
    """``(examples/s, s/step, peak GiB, first s)``, or the refusal / failure as a string."""
    try:
        with forced(backend):
            return timed(step, batches, dev, warm, steps)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "out of memory"
    except packmask.PackmaskError as e:
        if "cannot run this layer" in str(e):
            return f"refused: {str(e)[:200]}"
        raise


#: tree rows under automatic dispatch and forced onto each tree kernel (a refused kernel is reported)
TREE_KERNELS = {"tree": "auto", "tree_triton": "tree_triton", "tree_varlen": "varlen"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="shrunken CPU run (also the default without CUDA)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--cases", default="ultrafeedback,long_prompt,grpo,agentic")
    ap.add_argument("--tree-row", type=int, default=0,
                    help="tokens per tree row (same token slots a step as the other packed methods; 0: --row's)")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    smoke = dev == "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    s = 20 if smoke else 1                         # length shrink factor
    row, rows_per_step = (8192 // 16, 2) if smoke else (8192, 2)
    tree_row = a.tree_row // (16 if smoke else 1)  # the smoke run shrinks rows 16x
    cfg = dict(vocab_size=512 if smoke else 32000, hidden_size=64 if smoke else 2048,
               intermediate_size=128 if smoke else 5632, num_hidden_layers=2 if smoke else 8,
               num_attention_heads=4 if smoke else 32, num_key_value_heads=2 if smoke else 4,
               max_position_embeddings=row)
    steps, warm = (a.steps or (2 if smoke else 6)), (1 if smoke else 2)
    V = cfg["vocab_size"]
    rng = np.random.default_rng(0)
    tok = lambda n: rng.integers(3, V, int(n)).tolist()  # noqa: E731
    cases = {
        "ultrafeedback": ("dpo", dict(p=160, r=250, sp=0.7, sr=0.6)),
        "long_prompt": ("dpo", dict(p=2000, r=300, sp=0.2, sr=0.5)),
        "grpo": ("grpo", dict(p=512, r=400, sp=0.3, sr=0.6, G=8)),
        "agentic": ("agentic", dict(ctx=100, reply=200)),
    }
    policy = make_model("packmask", cfg, dev, dtype)
    ref = make_model("packmask", cfg, dev, dtype).eval()
    sdpa_policy = make_model("sdpa", cfg, dev, dtype)
    sdpa_ref = make_model("sdpa", cfg, dev, dtype).eval()
    env = dict(torch=torch.__version__, transformers=transformers.__version__, packmask=packmask.__version__,
               device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", dtype=str(dtype),
               date=time.strftime("%Y-%m-%d"), row=row, rows_per_step=rows_per_step, layers=cfg["num_hidden_layers"],
               hidden=cfg["hidden_size"], steps=steps, smoke=smoke, tree_row=tree_row or row)
    print(env)
    results, failed = {}, False
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for case in a.cases.split(","):
        kind, c = cases[case]
        if kind == "agentic":
            res, ok = agentic_case(c, s, smoke, rng, tok, row, rows_per_step, policy, sdpa_policy, dev, warm, steps, tol,
                                   tree_row)
        else:
            res, ok = preference_case(kind, c, s, smoke, rng, tok, row, rows_per_step, policy, ref, sdpa_policy,
                                      sdpa_ref, dev, warm, steps, tol, tree_row)
        results[case] = res
        failed |= not ok
        print_table(case, res)
        if a.out:   # after every case, atomically: a run cut short keeps what it measured
            os.makedirs(a.out, exist_ok=True)
            path = os.path.join(a.out, "preference.json")
            with open(path + ".tmp", "w") as f:
                json.dump(dict(env=env, results=results), f, indent=1)
            os.replace(path + ".tmp", path)
    return 1 if failed else 0


def check_sums(case, sums, tol):
    base = sums["dup_varlen"] if "dup_varlen" in sums else sums["paths_varlen"]
    errs = {k: ((v - base).norm() / base.norm()).item() for k, v in sums.items()}
    ok = all(e < tol for e in errs.values())
    print(f"[{case}] check (rel. err of per-branch log-prob sums): "
          + ", ".join(f"{k}={e:.1e}" for k, e in errs.items()) + (" OK" if ok else " FAILED"))
    return errs, ok


def preference_case(kind, c, s, smoke, rng, tok, row, rows_per_step, policy, ref, sdpa_policy, sdpa_ref, dev, warm,
                    steps, tol, tree_row=0):
    G = c.get("G", 2)
    n = 24 if smoke else (200 if kind == "dpo" else 60)
    plen = lognormal(rng, n, c["p"] / s, c["sp"], 2, row // 4)
    rlen = lognormal(rng, n * G, c["r"] / s, c["sr"], 1, row // 4).reshape(n, G)
    fits = plen * G + rlen.sum(1) <= row          # the duplicated-prompt layout must fit a row too
    plen, rlen = plen[fits], rlen[fits]
    examples = [(tok(plen[i]), [tok(x) for x in rlen[i]]) for i in range(len(plen))]
    ideal = float((plen * G + rlen.sum(1)).sum() / (plen + rlen.sum(1)).sum())
    step = dpo_step if kind == "dpo" else grpo_step
    pad_per_step = 8 if kind == "dpo" else 2
    tree_batches = packed_batches(examples, *tree_rows(row, rows_per_step, tree_row), False, dev)
    methods = {name: (policy, ref, tree_batches, backend) for name, backend in TREE_KERNELS.items()}
    methods["dup_varlen"] = (policy, ref, packed_batches(examples, row, rows_per_step, True, dev), "auto")
    methods["trl_padded"] = (sdpa_policy, sdpa_ref, padded_batches(examples, pad_per_step, dev, True, kind == "grpo"),
                             "auto")
    if kind == "dpo":
        methods["pad_nomask"] = (sdpa_policy, sdpa_ref, padded_batches(examples, pad_per_step, dev, False), "auto")
    # correctness: per-branch sums of the same examples agree across methods
    check = examples[:4]
    sums, refused = {}, {}
    for name, (pol, _, _, backend) in methods.items():
        b = (packed_batches(check, 4 * row, 1, name == "dup_varlen", dev) if name in TREE_KERNELS or name == "dup_varlen"
             else padded_batches(check, 4, dev, name == "trl_padded", kind == "grpo"))[0]
        try:
            with torch.no_grad(), forced(backend):
                sums[name] = branch_sums(pol, b[0], b[1]).float()
        except packmask.PackmaskError as e:
            if "cannot run this layer" not in str(e):
                raise
            refused[name] = str(e)[:200]
    errs, ok = check_sums(kind, sums, tol)
    res = dict(ideal_token_ratio=ideal, check=errs, methods={})
    for name, (pol, rf, batches, backend) in methods.items():
        if not batches:
            continue
        if name in refused:
            res["methods"][name] = dict(refused=refused[name])
            continue
        out = run_method(lambda kw, b: step(pol, rf, kw, b), backend, batches, dev, warm, steps)
        pol.zero_grad(set_to_none=True)
        res["methods"][name] = (dict(examples_per_s=out[0], step_s=out[1], peak_gib=out[2], first_s=out[3],
                                     row_fill=row_fill(batches)) if isinstance(out, tuple)
                                else dict(refused=out) if out.startswith("refused") else dict(error=out))
    return res, ok


def agentic_case(c, s, smoke, rng, tok, row, rows_per_step, policy, sdpa_policy, dev, warm, steps, tol, tree_row=0):
    from _agentic import LEAVES, forests, padded_rollouts, rollout_group, rollout_totals
    n = 6 if smoke else 24
    groups = [rollout_group(rng, tok, c["ctx"] / s, c["reply"] / s) for _ in range(n)]
    tree_forest, paths_forest = forests(groups)
    ideal = float(paths_forest.seg_lengths.sum() / tree_forest.seg_lengths.sum())
    tree_batches = forest_batches(tree_forest, *tree_rows(row, rows_per_step, tree_row), False, dev)
    methods = {name: (policy, tree_batches, backend, 1) for name, backend in TREE_KERNELS.items()}
    methods["paths_varlen"] = (policy, forest_batches(paths_forest, row, rows_per_step, True, dev), "auto", LEAVES)
    methods["dense_padded"] = (sdpa_policy, padded_rollouts(groups, 1, dev), "auto", 1)
    # correctness: every rollout's total log-prob, first two groups, across methods
    few = groups[:2]
    t_few, p_few = forests(few)
    sums, refused = {}, {}
    for name, (pol, _, backend, _) in methods.items():
        if name == "dense_padded":
            kw, b, _ = padded_rollouts(few, 2, dev)[0]
        else:
            f = p_few if name == "paths_varlen" else t_few
            kw, b, _ = forest_batches(f, int(f.seg_lengths.sum()), 1, name == "paths_varlen", dev)[0]
        try:
            with torch.no_grad(), forced(backend):
                per_branch = branch_sums(pol, kw, b).float()
        except packmask.PackmaskError as e:
            if "cannot run this layer" not in str(e):
                raise
            refused[name] = str(e)[:200]
            continue
        sums[name] = (per_branch.cpu().double() if name == "dense_padded"
                      else rollout_totals(per_branch, b, few, name != "paths_varlen")).float()
    errs, ok = check_sums("agentic", sums, tol)
    res = dict(ideal_token_ratio=ideal, check=errs, methods={}, rollouts_per_group=LEAVES)
    for name, (pol, batches, backend, per_group) in methods.items():
        if name in refused:
            res["methods"][name] = dict(refused=refused[name])
            continue
        out = run_method(lambda kw, b: grpo_step(pol, None, kw, b), backend, batches, dev, warm, steps)
        pol.zero_grad(set_to_none=True)
        res["methods"][name] = (dict(examples_per_s=out[0] / per_group, step_s=out[1], peak_gib=out[2],
                                     first_s=out[3], row_fill=row_fill(batches))
                                if isinstance(out, tuple) else dict(refused=out) if out.startswith("refused")
                                else dict(error=out))
    return res, ok


def print_table(case, res):
    m = res["methods"]
    unit = "groups/s" if case in ("grpo", "agentic") else "examples/s"
    other = "paths" if case == "agentic" else "dup"
    print(f"\n{case}: ideal token ratio ({other}/tree) {res['ideal_token_ratio']:.2f}")
    print(f"{'method':<14}{unit:>12}{'step s':>10}{'first s':>10}{'peak GiB':>10}{'row fill':>10}{'tree / this':>13}")
    tree = m.get("tree", {}).get("examples_per_s")
    for name, r in m.items():
        if "examples_per_s" not in r:
            print(f"{name:<14} {r.get('refused') or r.get('error')}")
            continue
        ratio = tree / r["examples_per_s"] if tree else float("nan")
        fill = "-" if r.get("row_fill") is None else f"{r['row_fill']:.2f}"
        print(f"{name:<14}{r['examples_per_s']:>12.2f}{r['step_s']:>10.3f}{r['first_s']:>10.3f}{r['peak_gib']:>10.2f}"
              f"{fill:>10}{ratio:>13.2f}")


if __name__ == "__main__":
    sys.exit(main())
