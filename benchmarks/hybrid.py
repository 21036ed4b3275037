"""Hybrid-model train step: packmask's exact packing beside padding, the contaminated packed run and
transformers' own seq_idx / cu_seq_lens path, one run, same documents, same kernels.

Models (``--model``):

  qwen35      Qwen3.5-shaped: gated delta net : attention = 3 : 1, 8 layers, hidden 2048
  nemotron_h  Nemotron-H-shaped: Mamba2 / MLP / attention blocks, 8 layers, hidden 2048

Methods (``--methods``, all by default):

  packmask_varlen   packed rows, attn_implementation="packmask", the recurrent layers once per row with the
                    layout's boundaries in the kernels (packmask.recurrent.configure(path="varlen"):
                    flash-linear-attention's chunk_gated_delta_rule / causal_conv1d with cu_seqlens,
                    mamba-ssm with seq_idx); skipped, with the reason, where that path cannot run
  packmask          packed rows, attn_implementation="packmask": attention masked per document, the
                    recurrent layers run per document (the generic path, configure(path="generic");
                    similar lengths share a call)
  packmask_strict   the same, one mixer call per document (packmask.recurrent.configure(batched=False)):
                    what grouping buys
  padding           one document per row, right-padded (batches of consecutive documents within the
                    same padded-token budget as the packed rows)
  contaminated      the packed rows as plain causal rows on sdpa: state and attention cross documents
                    (wrong; the speed ceiling)
  hf_seq_idx        transformers' own path: flattened rows with position_ids, cu_seq_lens and seq_idx on
                    sdpa (DataCollatorWithFlattening(return_seq_idx=True, return_flash_attn_kwargs=True)).
                    Exact only with the CUDA kernels (causal-conv1d + mamba-ssm, or fla); skipped when they
                    do not import

Per method: real (non-pad) tokens/s of fwd+bwd (``--pass fwd``: forward only, under no_grad: for
machines where a kernel's backward refuses, e.g. fla's gated-delta-rule backward on Hopper with
Triton < 3.7.1) (bf16 on GPU, fp32 on CPU), the first step's time beside the warm median, peak
memory, the calls each recurrent layer makes per step and the tokens they run, padding included
(``calls``, ``mixer tok``: packmask's generic path groups the documents into right-padded calls priced
per device), and a check of the first packed row against each document run alone
(packmask must match, contaminated must not). Table on stdout, JSON under --out / $OUT. Exits 1 when a
check fails.

    python benchmarks/hybrid.py --model all --dist sft --out results/     # GPU: 2 rows x 8192 tokens
    python benchmarks/hybrid.py --tiny                                     # CPU smoke test (tiny sizes)

With flash-linear-attention importable, transformers routes every method's gated-delta-rule calls to
fla on CUDA, so on Hopper with Triton < 3.7.1 (fla refuses its gated backward there) time the
forward with fla and fwd+bwd without it, and say which::

    PYTHONPATH=/tmp/fla python benchmarks/hybrid.py --pass fwd --out results/fwd    # fla: every method
    python benchmarks/hybrid.py --out results/fwdbwd        # no fla: packmask_varlen skipped, torch kernels
"""
import argparse
import math
import os
import sys
import time

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import packmask  # noqa: E402
from _report import chosen_methods, finish, record_error  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
METHODS = ("packmask_varlen", "packmask", "packmask_strict", "padding", "contaminated", "hf_seq_idx")
PACKED = ("packmask_varlen", "packmask", "packmask_strict", "contaminated")
FORWARD_ONLY = {"on": False}


def model_config(name: str, tiny: bool, vocab: int):
    """The benchmark shape of ``name`` (feature-detected config keys: transformers 5.17 and later)."""
    hidden, layers = (64, 4) if tiny else (2048, 8)
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, pad_token_id=0,
                  max_position_embeddings=65536)
    if name == "qwen35":
        pattern = (["linear_attention"] * 3 + ["full_attention"]) * (layers // 4)
        gdn = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                   head_dim=16, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96) if tiny else dict(
            linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
            head_dim=128, num_attention_heads=16, num_key_value_heads=4, intermediate_size=6144)
        return AutoConfig.for_model("qwen3_5_text", layer_types=pattern, **gdn, **common)
    if name == "nemotron_h":
        kinds = ["linear_attention", "mlp", "linear_attention", "full_attention"] * (layers // 4)
        mamba = dict(mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=8, head_dim=16,
                     num_attention_heads=4, num_key_value_heads=2, intermediate_size=96) if tiny else dict(
            mamba_num_heads=64, mamba_head_dim=64, ssm_state_size=128, n_groups=8, chunk_size=128, head_dim=128,
            num_attention_heads=16, num_key_value_heads=4, intermediate_size=8192)
        keys = AutoConfig.for_model("nemotron_h").to_dict()
        if "layers_block_type" in keys:
            blocks = dict(layers_block_type=kinds)
        else:  # older releases: one character per layer (M mamba, - mlp, * attention)
            letter = {"linear_attention": "M", "mlp": "-", "full_attention": "*"}
            blocks = dict(hybrid_override_pattern="".join(letter[k] for k in kinds))
        return AutoConfig.for_model("nemotron_h", expand=2, conv_kernel=4, **blocks, **mamba, **common)
    raise SystemExit(f"unknown --model {name!r}: qwen35, nemotron_h or all")


def kernels_available(name: str) -> tuple[bool, str]:
    """Whether transformers' own packed path has its CUDA kernels here (it is exact only with them)."""
    if DEV != "cuda":
        return False, "needs CUDA"
    from transformers.utils import import_utils as iu
    need = {"qwen35": ("is_flash_linear_attention_available", "is_causal_conv1d_available"),
            "nemotron_h": ("is_mamba_2_ssm_available", "is_causal_conv1d_available")}[name]
    missing = [f for f in need if not getattr(iu, f, lambda: False)()]
    return not missing, ("kernels import" if not missing else f"not importable: {', '.join(missing)}")


def lengths(n, median, cap, g):
    x = torch.exp(torch.randn(n, generator=g) * 0.9 + math.log(median))
    return x.clamp(4, cap).long().tolist()


def pack_rows(lens, rows, row_len):
    """Sequential next-fit: rows of documents (indices) filling ``rows`` x ``row_len``."""
    out, cur, used = [], [], 0
    for i, n in enumerate(lens):
        if used + n > row_len:
            out.append(cur)
            cur, used = [], 0
            if len(out) == rows:
                break
        cur.append(i)
        used += n
    if len(out) < rows and cur:
        out.append(cur)
    return out


def build(config, impl, dtype):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=impl, dtype=dtype).to(DEV).train()


def step(model, batches):
    """fwd + bwd over ``batches`` (list of kwargs); returns seconds (synchronised)."""
    if DEV == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for kwargs in batches:
        if FORWARD_ONLY["on"]:
            with torch.no_grad():
                model(**kwargs, use_cache=False)
            continue
        out = model(**kwargs, use_cache=False)
        out.loss.backward()
    if DEV == "cuda":
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def inputs_for(method, docs, rows, row_len, config):
    """(batches, real tokens) of one method over the same documents."""
    dev = DEV
    if method in PACKED:
        ids = torch.zeros(len(rows), row_len, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        seq_lengths = []
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                d = torch.tensor(docs[i])
                ids[r, at:at + len(d)] = d
                labels[r, at + 1:at + len(d)] = d[1:]
                at += len(d)
            seq_lengths.append([len(docs[i]) for i in row])
        kwargs = dict(input_ids=ids.to(dev), labels=labels.to(dev))
        if method != "contaminated":
            kwargs["seq_lengths"] = seq_lengths
        return [kwargs], int((labels != -100).sum() + len(sum(rows, [])))
    if method == "padding":
        budget, batches, cur = len(rows) * row_len, [], []
        for i in sum(rows, []):
            if cur and (len(cur) + 1) * max(len(docs[j]) for j in cur + [i]) > budget:
                batches.append(cur)
                cur = []
            cur.append(i)
        batches.append(cur)
        out = []
        for b in batches:
            n = max(len(docs[j]) for j in b)
            ids = torch.zeros(len(b), n, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, j in enumerate(b):
                ids[r, :len(docs[j])] = torch.tensor(docs[j])
                mask[r, :len(docs[j])] = 1
            labels = ids.masked_fill(mask == 0, -100)
            out.append(dict(input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev)))
        return out, sum(len(docs[j]) for j in sum(rows, []))
    if method == "hf_seq_idx":
        from transformers import DataCollatorWithFlattening
        collate = DataCollatorWithFlattening(return_seq_idx=True, return_flash_attn_kwargs=True, return_tensors="pt")
        out = []
        for row in rows:
            batch = collate([{"input_ids": docs[i]} for i in row])
            out.append({k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()})
        return out, sum(len(docs[i]) for i in sum(rows, []))
    raise ValueError(method)


def mixer_calls(method, batches, docs, rows):
    """(calls per recurrent layer per step, tokens those calls run, padding included) of ``method``:
    packmask's generic path groups every packed document of the step (packmask.recurrent.batched, the
    price of a call on this device), packmask_strict calls once per document, the others once per batch."""
    from packmask.recurrent.batched import call_overhead_rows_for, length_groups
    from packmask.recurrent.settings import SETTINGS
    spans = []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            spans.append((r, at, at + len(docs[i])))
            at += len(docs[i])
    if method == "packmask":
        groups = length_groups(spans, call_overhead_rows_for(DEV, SETTINGS["call_overhead_rows"]))
        return len(groups), sum(len(members) * longest for members, longest in groups)
    if method == "packmask_strict":
        return len(spans), sum(e - s for _, s, e in spans)
    return len(batches), sum(b["input_ids"].numel() for b in batches)


def check_row(model, kwargs, docs, row, tol):
    """Relative error of the first packed row's logits against each of its documents alone."""
    with torch.no_grad():
        packed = model(**{k: (v[:1] if isinstance(v, torch.Tensor) else v[:1]) for k, v in kwargs.items()
                          if k != "labels"}, use_cache=False).logits[0].float()
        errs, at = [], 0
        for i in row:
            n = len(docs[i])
            alone = model(input_ids=torch.tensor([docs[i]], device=DEV), use_cache=False).logits[0].float()
            errs.append(((packed[at:at + n] - alone).norm() / alone.norm()).item())
            at += n
    return max(errs)


def run_model(name, args, failures):
    tiny = args.tiny or DEV == "cpu"
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    row_len, nrows = (64, 2) if tiny else (args.row_len, args.rows)
    median = {"sft": 400, "long": 1500}[args.dist] if not tiny else 12
    vocab = 128 if tiny else 32768
    config = model_config(name, tiny, vocab)
    g = torch.Generator().manual_seed(0)
    lens = lengths(4 * row_len // median + 64, median, row_len, g)
    rows = pack_rows(lens, nrows, row_len)
    docs = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    results = []
    for method in args.methods:
        res = dict(model=name, method=method)
        results.append(res)
        if method == "hf_seq_idx":
            ok, why = kernels_available(name)
            if not ok:
                res["skipped"] = f"transformers' kernels {why}"
                continue
        try:
            impl = "packmask" if method.startswith("packmask") else "sdpa"
            model = build(config, impl, dtype)
            path = "varlen" if method == "packmask_varlen" else "generic"
            previous = packmask.recurrent.configure(batched=method != "packmask_strict", path=path)
            try:
                if method == "packmask_varlen":
                    refused = {n: i["why"] for n, i in packmask.recurrent.describe_paths(model, dtype=dtype).items()
                               if i["path"] != "varlen"}
                    if refused:
                        res["skipped"] = f"varlen path refused: {next(iter(refused.values()))}"
                        continue
                batches, real = inputs_for(method, docs, rows, row_len, config)
                res["mixer_calls"], res["mixer_tokens"] = mixer_calls(method, batches, docs, rows)
                if DEV == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                first = step(model, batches)
                times = [step(model, batches) for _ in range(args.steps)]
                warm = sorted(times)[len(times) // 2]
                res.update(first_s=first, step_s=warm, tokens_per_s=real / warm, real_tokens=real,
                           peak_gib=torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else None)
                if method in PACKED:
                    res["row0_rel_err"] = check_row(model, batches[0], docs, rows[0], tol)
                    if method == "contaminated" and res["row0_rel_err"] <= tol:
                        failures.append(f"{name}/contaminated matches the documents alone: the check is blind")
                    if method != "contaminated" and res["row0_rel_err"] > tol:
                        failures.append(f"{name}/{method}: row 0 differs from its documents alone "
                                        f"({res['row0_rel_err']:.1e} > {tol:.0e})")
            finally:
                packmask.recurrent.configure(**previous)
            del model
        except Exception as error:  # noqa: BLE001 - reported and failing, never hidden
            record_error(res, failures, f"{name}/{method}", error)
        finally:  # each method as it ends (skipped ones too): a run cut short by a time limit still shows it
            print(f"  {name}/{method}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in res.items() if k not in ("model", "method")), flush=True)
        if DEV == "cuda":
            torch.cuda.empty_cache()
    base = next((r for r in results if r["method"] == "contaminated" and "tokens_per_s" in r), None)
    pad = next((r for r in results if r["method"] == "padding" and "tokens_per_s" in r), None)
    for r in results:
        if "tokens_per_s" in r:
            r["vs_contaminated"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
            r["vs_padding"] = r["tokens_per_s"] / pad["tokens_per_s"] if pad else None
    return dict(model=name, rows=nrows, row_len=row_len, docs_per_row=[len(r) for r in rows],
                median_doc=median, results=results)


def table(records):
    lines = [f"{'model':<11} {'method':<16} {'tok/s':>10} {'vs contam':>9} {'vs pad':>7} {'warm s':>8} "
             f"{'first s':>8} {'peak GiB':>8} {'row0 err':>9} {'calls':>5} {'mixer tok':>9}  note"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for rec in records:
        for r in rec["results"]:
            note = r.get("skipped") or r.get("error") or ""
            lines.append(f"{rec['model']:<11} {r['method']:<16} {fmt(r.get('tokens_per_s'), '10.0f')} "
                         f"{fmt(r.get('vs_contaminated'), '9.2f')} {fmt(r.get('vs_padding'), '7.2f')} "
                         f"{fmt(r.get('step_s'), '8.3f')} {fmt(r.get('first_s'), '8.3f')} "
                         f"{fmt(r.get('peak_gib'), '8.2f')} {fmt(r.get('row0_rel_err'), '9.1e')} "
                         f"{fmt(r.get('mixer_calls'), '5d')} {fmt(r.get('mixer_tokens'), '9d')}  {note}")
    return "\n".join(lines)


def _version(module: str):
    try:
        return getattr(__import__(module), "__version__", "installed")
    except Exception:  # noqa: BLE001 - absent or broken: recorded as such
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="all", help="qwen35, nemotron_h or all")
    ap.add_argument("--dist", default="sft", choices=("sft", "long"), help="document lengths: median 400 or 1500")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--row-len", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (CPU smoke test)")
    ap.add_argument("--pass", dest="passes", default="fwdbwd", choices=("fwdbwd", "fwd"),
                    help="time fwd+bwd (default) or the forward only (no_grad)")
    ap.add_argument("--out", default=None, help="folder for hybrid.json (default $OUT)")
    args = ap.parse_args(argv)
    args.methods = chosen_methods(args.methods, METHODS)
    FORWARD_ONLY["on"] = args.passes == "fwd"
    names = ("qwen35", "nemotron_h") if args.model == "all" else (args.model,)
    failures = []
    records = [run_model(n, args, failures) for n in names]
    print(table(records))
    record = dict(script="benchmarks/hybrid.py", device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
                  torch=torch.__version__, transformers=transformers.__version__, packmask=packmask.__version__,
                  date=time.strftime("%Y-%m-%d"), dist=args.dist, measured=args.passes,
                  kernels={m: _version(m) for m in ("fla", "triton", "mamba_ssm", "causal_conv1d", "kernels")}, tiny=args.tiny or DEV == "cpu", records=records)
    finish("hybrid", record, failures, out=args.out)


if __name__ == "__main__":
    main()
