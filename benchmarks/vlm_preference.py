"""Vision-language DPO step (or, with ``--group G``, a GRPO log-prob step over G completions per prompt):
shared-prefix trees (the prompt and its images once) beside the prompt duplicated per answer (packed)
and TRL's padded layout, one run, same examples.

Model: the Qwen2.5-VL shape of benchmarks/vlm.py (a small windowed vision tower, an 8-layer
2048-hidden mRoPE text decoder). Data: prompts with 0-4 images of 64-1024 image tokens and text of
median ~300 tokens (benchmarks/vlm.py's samples), each with a chosen and a rejected answer of median
~250 tokens. A DPO step = reference forward (no grad) + policy forward + backward of the sigmoid loss
(one model plays both: the timing is the same). With ``--group G`` (GRPO, what PackedGRPOTrainer runs):
each prompt has G completions of median ~250 tokens, and a step = old-policy forward (no grad) + policy
forward + backward of an advantage-weighted ratio loss. Methods:

  tree          MultimodalTreeCollator rows on attn_implementation="packmask": prompt + images once,
                each answer a branch (a [B, N, N] tree mask, the tree kernels); vision tower varlen
  dup_packed    every prompt + answer path a sample of MultimodalCollator rows (packmask varlen): the
                prompt and its images twice
  padded_sdpa   every path a right-padded row (2D mask) on sdpa: the layout of TRL's vision DPO collator

Reports examples/s (first call beside the warm median), peak memory, real tokens per method, and
checks that every method gives the same per-answer log-prob sums -- and that the tree rows with answers
seeing their siblings (the control) do not. Exits 1 on a failed check.

    python benchmarks/vlm_preference.py --out results/                 # GPU (bf16): 2 rows x 8192 tokens
    python benchmarks/vlm_preference.py --tiny --device cpu            # seconds on a CPU (fp32, tiny)
    python benchmarks/vlm_preference.py --group 8 --out results/       # GRPO, G = 8 (vlm_grpo.json)
    python benchmarks/vlm_preference.py --group 8 --tiny --device cpu
"""
import argparse
import datetime
import math
import os
import sys

import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import packmask  # noqa: E402
from packmask.multimodal import MultimodalCollator, MultimodalTreeCollator, varlen_vision  # noqa: E402
from packmask.multimodal.tree import model_inputs  # noqa: E402
from packmask.multimodal.tree_verify import control_batch, path_features  # noqa: E402
from _report import finish  # noqa: E402
from vlm import common_args, make_samples, settings, timed_steps  # noqa: E402


def make_examples(config, n, tiny, device, dtype, g, group=None):
    """Prompts (benchmarks/vlm.py's samples, no labels) with a chosen and a rejected answer each, or
    ``group`` completions each (``completion_ids``)."""
    median = 20 if tiny else 250
    vocab = 90 if tiny else 30000
    out = []
    for s in make_samples(config, n, tiny, device, dtype, g):
        s.pop("labels")
        answer = lambda: torch.randint(10, vocab, (int(min(max(math.exp(torch.randn(1, generator=g).item() * 0.5  # noqa: E731
                                                                        + math.log(median)), 4), 4 * median)),),
                                       generator=g).tolist()
        out.append(dict(s, completion_ids=[answer() for _ in range(group)]) if group
                   else dict(s, chosen_ids=answer(), rejected_ids=answer()))
    return out


def answer_lists(examples):
    """Every answer in the trees' branch order: chosen of every example, then rejected; or every
    example's completions in turn."""
    if "completion_ids" in examples[0]:
        return [(ex, c) for ex in examples for c in ex["completion_ids"]]
    return [(ex, ex[key]) for key in ("chosen_ids", "rejected_ids") for ex in examples]


def paths(examples):
    """Every prompt + answer path alone, in the trees' branch order."""
    return [(ex, path_features(ex, answer)) for ex, answer in answer_lists(examples)]


def answer_logps(logits, spans, answers):
    """Per-answer sums of log p(answer token) from ``logits[b, start + P - 1 : ...]`` of every path."""
    sums = []
    for (b, start, P), answer in zip(spans, answers):
        rows = logits[b, start + P - 1:start + P - 1 + len(answer)].float().log_softmax(-1)
        sums.append(rows.gather(1, torch.tensor(answer, device=rows.device)[:, None]).sum())
    return torch.stack(sums)


def scoring_logits(logits, spans, answers):
    """``[T, V]`` float CPU logits predicting every answer token, path after path (the tree's branch order)."""
    return torch.cat([logits[b, start + P - 1:start + P - 1 + len(answer)]
                      for (b, start, P), answer in zip(spans, answers)]).float().cpu()


def dpo_loss(sums, ref_sums, beta=0.1):
    E = sums.shape[0] // 2
    return -F.logsigmoid(beta * ((sums[:E] - ref_sums[:E]) - (sums[E:] - ref_sums[E:]))).mean()


def grpo_loss(sums, old_sums):
    """An advantage-weighted sequence-ratio loss (fixed advantages): GRPO's shape for timing."""
    adv = torch.linspace(-1.0, 1.0, sums.shape[0], device=sums.device)
    return -(adv * torch.exp(sums - old_sums)).mean()


def padded_batch(all_paths, pad_id=0):
    """One right-padded row per path with a 2D attention_mask; the model computes its own positions."""
    L = max(p["input_ids"].shape[1] for _, p in all_paths)
    pad = lambda t, v: F.pad(t[0], (0, L - t.shape[1]), value=v)  # noqa: E731
    out = dict(input_ids=torch.stack([pad(p["input_ids"], pad_id) for _, p in all_paths]),
               mm_token_type_ids=torch.stack([pad(p["mm_token_type_ids"], 0) for _, p in all_paths]),
               attention_mask=torch.stack([pad(torch.ones_like(p["input_ids"]), 0) for _, p in all_paths]))
    with_images = [p for _, p in all_paths if "pixel_values" in p]
    if with_images:
        out["pixel_values"] = torch.cat([p["pixel_values"] for p in with_images])
        out["image_grid_thw"] = torch.cat([p["image_grid_thw"] for p in with_images])
    return dict(out, use_cache=False)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args(p, "tree row", "vlm_preference.json / vlm_grpo.json")
    p.add_argument("--group", type=int, default=None, help="GRPO: completions per prompt (e.g. 8); default DPO pairs")
    args = p.parse_args(argv)
    row, dtype, tol, config, g = settings(args)
    pool = make_examples(config, 64, args.tiny, args.device, dtype, g, args.group)
    def size(ex):
        answers = ex["completion_ids"] if args.group else (ex["chosen_ids"], ex["rejected_ids"])
        return ex["input_ids"].shape[1] + sum(len(a) for a in answers)

    loss_fn = grpo_loss if args.group else dpo_loss
    examples, used = [], 0
    for ex in pool:  # fill about rows x row tokens of trees (best fit packs them)
        if size(ex) <= row and used + size(ex) <= 0.97 * args.rows * row:
            examples.append(ex)
            used += size(ex)
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).to(args.device, dtype).train()
    packmask.enable(model)
    tree = MultimodalTreeCollator(model, row)(examples)
    all_paths = paths(examples)
    answers = [a for _, a in answer_lists(examples)]
    dup_collator = MultimodalCollator(model, max_length=max(row, max(q["input_ids"].shape[1] for _, q in all_paths)))
    dup_rows = dup_collator.rows([q for _, q in all_paths])
    dup = dup_collator.collate_rows(dup_rows)
    # spans of every path in the duplicated rows: (row, start, prompt length), in path order
    dup_spans, k = [], 0
    for b, r in enumerate(dup_rows):
        start = 0
        for s in r:
            dup_spans.append((b, start, s["input_ids"].shape[1] - len(answers[k])))
            start += s["input_ids"].shape[1]
            k += 1
    padded = padded_batch(all_paths)
    pad_spans = [(i, 0, ex["input_ids"].shape[1]) for i, (ex, _) in enumerate(all_paths)]
    images = sum(len(ex.get("image_grid_thw", [])) for ex in examples)
    tokens = dict(tree=int(tree["input_ids"].numel()), dup_packed=int(dup["input_ids"].numel()),
                  padded_sdpa=int(padded["input_ids"].numel()))
    print(f"{len(examples)} examples, {images} images; slots: tree {tokens['tree']} ({tree['input_ids'].shape[0]} rows), "
          f"duplicated {tokens['dup_packed']} ({len(dup_rows)} rows), padded {tuple(padded['input_ids'].shape)}")

    def tree_step(batch=tree):
        with torch.no_grad():
            ref = packmask.branch_logps(model(**model_inputs(batch)).logits, batch).sums
        sums = packmask.branch_logps(model(**model_inputs(batch)).logits, batch).sums
        loss_fn(sums, ref).backward()
        return sums.detach()

    def spans_step(batch, spans):
        with torch.no_grad():
            ref = answer_logps(model(**batch).logits, spans, answers)
        sums = answer_logps(model(**batch).logits, spans, answers)
        loss_fn(sums, ref).backward()
        return sums.detach()

    methods = [("tree", "packmask", tree_step), ("dup_packed", "packmask", lambda: spans_step(dup, dup_spans)),
               ("padded_sdpa", "sdpa", lambda: spans_step(padded, pad_spans))]
    results, sums, failures = {}, {}, []
    for name, impl, step in methods:
        model.set_attn_implementation(impl)
        varlen_vision(model, enable=impl == "packmask")
        try:
            first, warm, peak, sums[name] = timed_steps(model, step, args.steps, args.device)
        except torch.cuda.OutOfMemoryError as error:  # reported as a row, never hidden
            results[name] = dict(error=f"OOM: {str(error).splitlines()[0]}")
            failures.append(f"{name}: out of memory")
            continue
        results[name] = dict(first_call_s=first, warm_step_s=warm, examples_per_s=len(examples) / warm,
                             peak_memory_gib=peak / 2 ** 30, slots=tokens[name])
    varlen_vision(model, enable=False)
    try:
        with torch.no_grad():  # logits predicting every answer token: each path alone, the tree, the control
            model.set_attn_implementation("sdpa")
            alone = scoring_logits(model(**padded).logits, pad_spans, answers)
            model.set_attn_implementation("packmask")
            tree_logits = model(**model_inputs(tree)).logits
            tree_logits = tree_logits.reshape(-1, tree_logits.shape[-1])[tree["logp_source"]].float().cpu()
            wrong = control_batch(tree, "siblings")  # the control: answers that see their siblings
            control = model(**model_inputs(wrong)).logits
            control = control.reshape(-1, control.shape[-1])[wrong["logp_source"]].float().cpu()
    except torch.cuda.OutOfMemoryError as error:
        failures.append(f"logits check: out of memory ({str(error).splitlines()[0]})")
    else:
        # logits, not log-prob sums: a random-init model's log-probs are all about -log(vocab), so their sums
        # barely move when an answer sees its siblings, and a check on them could not tell
        err = ((tree_logits - alone).norm() / alone.norm()).item()
        results.setdefault("tree", {})["logits_rel_err_vs_alone"] = err
        if err > tol:
            failures.append(f"tree: logits of the answer tokens differ from each path alone by {err:.2e}")
        control_err = ((control - alone).norm() / alone.norm()).item()
        results["control_siblings_rel_err"] = control_err
        if control_err <= tol:
            failures.append(f"control: answers seeing their siblings differ by only {control_err:.2e}: the check is "
                            f"blind")
    ref = sums.get("padded_sdpa")
    if ref is not None:
        scale = ref.abs().mean()  # sums of O(100) log-probs: errors relative to their size
        for name in ("tree", "dup_packed"):
            if name in sums:
                err = ((sums[name] - ref).abs().max() / scale).item()
                results[name]["logp_sums_rel_err_vs_alone"] = err
                if err > tol:
                    failures.append(f"{name}: per-answer log-prob sums differ from each path alone by {err:.2e}")
    base = results.get("padded_sdpa", {}).get("examples_per_s")
    dupr = results.get("dup_packed", {}).get("examples_per_s")
    print(f"\n{'method':<14}{'examples/s':>12}{'x padded':>10}{'x dup':>8}{'warm s':>9}{'first s':>9}{'peak GiB':>10}"
          f"{'slots':>9}{'rel err':>10}")
    for name, _, _ in methods:
        r = results.get(name, {})
        if "error" in r:
            print(f"{name:<14}{r['error']}")
            continue
        eps = r["examples_per_s"]
        print(f"{name:<14}{eps:>12.2f}{eps / base if base else float('nan'):>10.2f}"
              f"{eps / dupr if dupr else float('nan'):>8.2f}{r['warm_step_s']:>9.3f}{r['first_call_s']:>9.3f}"
              f"{r['peak_memory_gib']:>10.2f}{r['slots']:>9}{r.get('logp_sums_rel_err_vs_alone', float('nan')):>10.1e}")
    print(f"answer logits rel err vs each path alone: tree {results.get('tree', {}).get('logits_rel_err_vs_alone', float('nan')):.1e}, "
          f"control (answers see their siblings) {results.get('control_siblings_rel_err', float('nan')):.1e}")
    env = dict(script="benchmarks/vlm_preference.py",
               device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
               torch=torch.__version__, transformers=transformers.__version__, packmask=packmask.__version__,
               dtype=str(dtype).replace("torch.", ""), date=datetime.date.today().isoformat(), tiny=args.tiny,
               row=row, rows=int(tree["input_ids"].shape[0]), examples=len(examples), images=images, steps=args.steps,
               workload=f"grpo G={args.group}" if args.group else "dpo")
    finish("vlm_grpo" if args.group else "vlm_preference", dict(env=env, results=results, failures=failures), failures,
           out=args.out)


if __name__ == "__main__":
    main()
