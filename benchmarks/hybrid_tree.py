"""Shared-prefix trees on a hybrid model: tree rows beside duplicated prompts and padding, one run.

The same preference / GRPO examples (a prompt and G answers each), fwd+bwd of the summed answer-token
loss, on the Qwen3.5- or Nemotron-H-shaped models of ``benchmarks/hybrid.py``:

  tree        packed tree rows (prompt once, answers as branches; attn_implementation="packmask"):
              attention shares the prompt through the tree mask; the recurrent layers run each
              root-to-leaf path (packmask.recurrent.tree_paths), so they recompute the prompt per answer
  duplicated  packed rows of prompt+answer documents (seq_lengths): the prompt G times everywhere
  padding     one prompt+answer per row, right-padded (batches within the same padded-token budget)

Shapes (``--shape``): ``dpo`` (G = 2, prompt median 600, answers 300) and ``grpo`` (G = 8, prompt 400,
completions 200); rows of ``--row-len`` tokens (the tree rows; the other methods get the same examples).
Per method: step time (first beside warm median), examples/s, ratios, peak memory, and the loss checked
against the duplicated rows (tree must match: fp32 1e-4, bf16 5e-2 relative). Table on stdout, JSON
(``hybrid_tree.json``) under --out / $OUT; exits 1 when a check fails.

    python benchmarks/hybrid_tree.py --model all --shape dpo --out results/    # GPU
    python benchmarks/hybrid_tree.py --model all --shape grpo --out results/   # GPU
    python benchmarks/hybrid_tree.py --tiny                                     # CPU smoke test
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import packmask  # noqa: E402
from _report import chosen_methods, finish, record_error  # noqa: E402
from hybrid import DEV, build, model_config  # noqa: E402
from packmask.layout_tree import TreeLayout  # noqa: E402

METHODS = ("tree", "duplicated", "padding")
SHAPES = {"dpo": (2, 600, 300), "grpo": (8, 400, 200)}  # answers per prompt, prompt median, answer median


def lengths(n, median, cap, g):
    x = torch.exp(torch.randn(n, generator=g) * 0.6 + math.log(median))
    return x.clamp(2, cap).long().tolist()


def examples(shape, tiny, row_len, rows, vocab, g):
    """Examples ``(prompt, [answers])`` (token lists) filling about ``rows`` tree rows."""
    G, p_med, a_med = SHAPES[shape]
    if tiny:
        p_med, a_med = 10, 6
    out, used = [], 0
    while True:
        p = lengths(1, p_med, row_len // 2, g)[0]
        answers = lengths(G, a_med, (row_len - p) // G, g)
        size = p + sum(answers)
        if used + size > rows * row_len:
            return out
        out.append((torch.randint(3, vocab, (p,), generator=g).tolist(),
                    [torch.randint(3, vocab, (a,), generator=g).tolist() for a in answers]))
        used += size


def tree_rows(exs, row_len):
    """Next-fit into rows: (ids [B, N], segments per row, answer flags [B, N])."""
    rows, cur, at = [], [], 0
    for e, (p, answers) in enumerate(exs):
        size = len(p) + sum(map(len, answers))
        if at + size > row_len:
            rows.append(cur)
            cur, at = [], 0
        cur.append(e)
        at += size
    rows.append(cur)
    ids = torch.zeros(len(rows), row_len, dtype=torch.long)
    answer = torch.zeros_like(ids, dtype=torch.bool)
    segments = []
    for r, row in enumerate(rows):
        segs, at = [], 0
        for e in row:
            p, answers = exs[e]
            root = len(segs)
            segs.append((at, len(p), -1))
            ids[r, at:at + len(p)] = torch.tensor(p)
            at += len(p)
            for a in answers:
                segs.append((at, len(a), root))
                ids[r, at:at + len(a)] = torch.tensor(a)
                answer[r, at:at + len(a)] = True
                at += len(a)
        segments.append(segs)
    return ids, segments, answer


def answer_loss(logits, ids, parent, answer):
    """Summed cross-entropy of every answer token, predicted from its parent token's logits."""
    b, t = torch.nonzero(answer, as_tuple=True)
    return F.cross_entropy(logits[b, parent[b, t]].float(), ids[b, t], reduction="sum")


def batches_for(method, exs, row_len):
    """A list of (model kwargs, ids, parent, answer) covering the same examples."""
    if method == "tree":
        ids, segments, answer = tree_rows(exs, row_len)
        layout = TreeLayout.from_segments(segments, row_len)
        mask = layout.dense_mask()[:, 0]
        kwargs = dict(input_ids=ids.to(DEV), attention_mask=mask.to(DEV), position_ids=layout.position_ids.to(DEV))
        return [(kwargs, ids.to(DEV), layout.parent.to(DEV), answer.to(DEV))]
    docs = [(p + a, len(p)) for p, answers in exs for a in answers]  # prompt + one answer
    if method == "duplicated":
        rows, cur, at = [], [], 0
        for d in docs:
            if at + len(d[0]) > 2 * row_len:  # duplicated prompts: the same examples need more tokens
                rows.append(cur)
                cur, at = [], 0
            cur.append(d)
            at += len(d[0])
        rows.append(cur)
        groups = [rows]
    else:
        budget, groups, cur = 2 * row_len, [], []
        for d in docs:
            if cur and (len(cur) + 1) * max(len(x) for x, _ in cur + [d]) > budget:
                groups.append([[x] for x in cur])
                cur = []
            cur.append(d)
        groups.append([[x] for x in cur])
    out = []
    for rows in groups:
        width = max(sum(len(d) for d, _ in r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        answer = torch.zeros_like(ids, dtype=torch.bool)
        parent = (torch.arange(width) - 1).clamp(min=0).expand(len(rows), width).clone()
        seq_lengths = []
        for r, row in enumerate(rows):
            at = 0
            for d, p in row:
                ids[r, at:at + len(d)] = torch.tensor(d)
                answer[r, at + p:at + len(d)] = True
                at += len(d)
            seq_lengths.append([len(d) for d, _ in row])
        kwargs = dict(input_ids=ids.to(DEV))
        if method == "duplicated":
            kwargs["seq_lengths"] = seq_lengths
        else:
            kwargs["attention_mask"] = (torch.arange(width)[None] < torch.tensor([s[0] for s in seq_lengths])[:, None]
                                        ).long().to(DEV)
        out.append((kwargs, ids.to(DEV), parent.to(DEV), answer.to(DEV)))
    return out


def step(model, batches):
    """fwd + bwd of the summed answer loss over ``batches``: (seconds, loss)."""
    if DEV == "cuda":
        torch.cuda.synchronize()
    t, total = time.perf_counter(), 0.0
    for kwargs, ids, parent, answer in batches:
        loss = answer_loss(model(**kwargs, use_cache=False).logits, ids, parent, answer)
        loss.backward()
        total += loss.item()
    if DEV == "cuda":
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t, total


#: answer tokens whose logits the exactness check compares (a [K, vocab] float tensor per method)
CHECKED_TOKENS = 512


def answer_logits(model, batches, k=CHECKED_TOKENS):
    """Float CPU logits predicting the first ``k`` answer tokens (every method lists them in the same order:
    example by example, answer by answer), forward only."""
    out = []
    with torch.no_grad():
        for kwargs, ids, parent, answer in batches:
            b, t = torch.nonzero(answer, as_tuple=True)
            out.append(model(**kwargs, use_cache=False).logits[b, parent[b, t]][:k].float().cpu())
            if sum(len(o) for o in out) >= k:
                break
    return torch.cat(out)[:k]


def run_model(name, args, failures):
    tiny = args.tiny or DEV == "cpu"
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    row_len, nrows = (96, 2) if tiny else (args.row_len, args.rows)
    vocab = 128 if tiny else 32768
    config = model_config(name, tiny, vocab)
    exs = examples(args.shape, tiny, row_len, nrows, vocab, torch.Generator().manual_seed(0))
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    results, losses, logits = [], {}, {}
    for method in args.methods:
        res = dict(model=name, method=method)
        results.append(res)
        try:
            model = build(config, "packmask" if method != "padding" else "sdpa", dtype)
            batches = batches_for(method, exs, row_len)
            if DEV == "cuda":
                torch.cuda.reset_peak_memory_stats()
            first, losses[method] = step(model, batches)
            warm = sorted(step(model, batches)[0] for _ in range(args.steps))[args.steps // 2]
            res.update(first_s=first, step_s=warm, examples_per_s=len(exs) / warm, loss=losses[method],
                       row_tokens=sum(b[1].numel() for b in batches),
                       peak_gib=torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else None)
            logits[method] = answer_logits(model, batches)
            del model
        except Exception as error:  # noqa: BLE001 - reported and failing, never hidden
            record_error(res, failures, f"{name}/{method}", error)
        if DEV == "cuda":
            torch.cuda.empty_cache()
    ref, ref_logits = losses.get("duplicated"), logits.get("duplicated")
    for r in results:
        if ref is not None and "loss" in r:
            r["loss_rel_err"] = abs(r["loss"] - ref) / abs(ref)
            if r["loss_rel_err"] > tol:
                failures.append(f"{name}/{r['method']}: loss differs from the duplicated rows "
                                f"({r['loss_rel_err']:.1e})")
        if ref_logits is not None and r["method"] in logits:
            # logits, not only the summed loss: a random-init model's loss is ~log(vocab) per token whatever
            # the context, so the loss alone could not see a branch that continues its sibling's state
            r["logits_rel_err"] = ((logits[r["method"]] - ref_logits).norm() / ref_logits.norm()).item()
            if r["logits_rel_err"] > tol:
                failures.append(f"{name}/{r['method']}: answer logits differ from the duplicated rows "
                                f"({r['logits_rel_err']:.1e})")
    if ref_logits is not None and "tree" in logits:  # control: the tree rows as plain causal rows (no tree mask)
        try:
            model = build(config, "sdpa", dtype)
            plain = [(dict(input_ids=kw["input_ids"]), ids, parent, answer)
                     for kw, ids, parent, answer in batches_for("tree", exs, row_len)]
            control = ((answer_logits(model, plain) - ref_logits).norm() / ref_logits.norm()).item()
            del model
            results.append(dict(model=name, method="control_plain_causal", logits_rel_err=control))
            if control <= tol:
                failures.append(f"{name}: control (tree rows without the tree mask) differs by only {control:.1e}: "
                                f"the check is blind")
        except Exception as error:  # noqa: BLE001 - reported and failing, never hidden
            failures.append(f"{name}/control: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
    by = {r["method"]: r for r in results if "step_s" in r}
    for r in by.values():
        r["vs_duplicated"] = by["duplicated"]["step_s"] / r["step_s"] if "duplicated" in by else None
        r["vs_padding"] = by["padding"]["step_s"] / r["step_s"] if "padding" in by else None
    G = SHAPES[args.shape][0]
    return dict(model=name, shape=args.shape, answers_per_prompt=G, examples=len(exs), row_len=row_len,
                prompt_tokens=sum(len(p) for p, _ in exs), answer_tokens=sum(len(a) for _, aa in exs for a in aa),
                results=results)


def table(records):
    lines = [f"{'model':<11} {'shape':<5} {'method':<11} {'ex/s':>9} {'vs dup':>7} {'vs pad':>7} {'warm s':>8} "
             f"{'first s':>8} {'peak GiB':>8} {'row tok':>8} {'loss err':>9} {'logit err':>9}  note"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for rec in records:
        for r in rec["results"]:
            lines.append(f"{rec['model']:<11} {rec['shape']:<5} {r['method']:<11} "
                         f"{fmt(r.get('examples_per_s'), '9.2f')} {fmt(r.get('vs_duplicated'), '7.2f')} "
                         f"{fmt(r.get('vs_padding'), '7.2f')} {fmt(r.get('step_s'), '8.3f')} "
                         f"{fmt(r.get('first_s'), '8.3f')} {fmt(r.get('peak_gib'), '8.2f')} "
                         f"{fmt(r.get('row_tokens'), '8d')} {fmt(r.get('loss_rel_err'), '9.1e')} "
                         f"{fmt(r.get('logits_rel_err'), '9.1e')}  {r.get('error', '')}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="all", help="qwen35, nemotron_h or all")
    ap.add_argument("--shape", default="dpo", choices=tuple(SHAPES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rows", type=int, default=2, help="tree rows of examples")
    ap.add_argument("--row-len", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (CPU smoke test)")
    ap.add_argument("--out", default=None, help="folder for hybrid_tree.json (default $OUT)")
    args = ap.parse_args(argv)
    args.methods = chosen_methods(args.methods, METHODS)
    names = ("qwen35", "nemotron_h") if args.model == "all" else (args.model,)
    failures = []
    records = [run_model(n, args, failures) for n in names]
    print(table(records))
    record = dict(script="benchmarks/hybrid_tree.py", device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
                  torch=torch.__version__, transformers=transformers.__version__, packmask=packmask.__version__,
                  date=time.strftime("%Y-%m-%d"), shape=args.shape, tiny=args.tiny or DEV == "cpu", records=records)
    finish("hybrid_tree", record, failures, out=args.out)


if __name__ == "__main__":
    main()
