#!/usr/bin/env python3
"""Generate docs/model-support.md: every causal LM family of the installed transformers, verified.

    python3 scripts/model_support.py                      # the full matrix (a few minutes, 2 processes)
    python3 scripts/model_support.py --families llama,bloom,mamba --output -   # a few, to stdout

For each ``model_type`` in ``transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``:

1. build a tiny random fp32 model offline (``packmask.testing.tiny_model``) with
   ``attn_implementation="packmask"``; families that cannot be built that way are
   ``unbuildable`` (with the reason), encoder-decoder families are ``skipped``;
2. run ``packmask.verify`` (3D mask, 4D mask, collator keys; logits, loss and parameter
   gradients vs each sequence alone, tolerance 1e-5) with a time limit;
3. classify: ``pass`` (every form within tolerance), ``refused`` (packed input raises a clear
   ``packmask.UnsupportedModelError`` naming the reason and the fix), ``FAIL`` (a wrong result:
   a bug), ``error`` (some other exception: a bug or a model that needs special inputs).

The page also checks that a refused family still runs an ordinary unpacked batch.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import multiprocessing as mp
import signal
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "docs" / "model-support.md"
COMMAND = "python3 scripts/model_support.py"


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def check_family(family: str, timeout: int = 120) -> dict:
    """Build ``family`` tiny, run verify; a JSON-able dict (runs in a worker process)."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    import packmask
    from packmask.support import unsupported_reason
    from packmask.testing import tiny_model

    row = dict(family=family, status=None, takes_position_ids=None, output=None, loss=None, grad=None, reason="",
               model_class="")
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    t0 = time.time()
    try:
        model = _build_model(family, row)
        if model is None:
            return row
        row["model_class"] = type(model).__name__
        row["takes_position_ids"] = "position_ids" in inspect.signature(type(model).forward).parameters
        if not row.get("multimodal") and all(  # (PaliGemma's prefix-LM text model is not causal either: packed as such)
                getattr(m, "is_causal", False) is False for m in model.modules() if hasattr(m, "is_causal")) and any(
                hasattr(m, "is_causal") for m in model.modules()):
            row.update(status="skipped", reason="bidirectional attention in this configuration (an encoder used as a "
                                                "decoder only with is_decoder=True): packed as an encoder, see "
                                                "tests/models/test_encoders.py")
            return row
        guard = unsupported_reason(model)
        row["recurrent_family"] = "state-space / recurrent" in (guard or "")
        if guard:  # the guard must refuse packed input before anything else runs (unless packmask.recurrent runs it)
            ids = torch.randint(3, min(100, model.get_input_embeddings().num_embeddings), (2, 18))
            try:
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=packmask.block_diagonal_mask([[5, 9, 4], [11, 6]], 18))
            except packmask.UnsupportedModelError as refusal:
                row.update(status="refused", reason=_first_line(refusal).split(": ", 1)[-1])
                try:
                    with torch.no_grad():
                        model(input_ids=ids)
                    row["unpacked"] = "ok"
                except Exception as e:  # noqa: BLE001
                    row["unpacked"] = _first_line(e)
                return row
        report = packmask.verify(model, print_table=False)
        w = report.worst()
        row.update(output=w["output"], loss=w["loss"], grad=w["grad"])
        if report.passed:
            row["status"] = "pass"
        elif report.refused:
            row["status"] = "refused"
            row["reason"] = (report.rows[0].error.split(": ", 1)[-1] + " " + row["reason"]).strip()
            # the guard must leave an ordinary batch alone
            try:
                ids = torch.randint(3, min(100, model.get_input_embeddings().num_embeddings), (2, 8))
                with torch.no_grad():
                    model(input_ids=ids)
                row["unpacked"] = "ok"
            except Exception as e:  # noqa: BLE001
                row["unpacked"] = _first_line(e)
        elif all(r.error is None for r in report.rows) and max(v for v in w.values() if v is not None) < 1e-3:
            # a near miss in fp32: is it rounding (exact in fp64) or a real difference?
            # reference on sdpa: transformers' eager takes its softmax in fp32 even for fp64 models
            worst32 = max(v for v in w.values() if v is not None)
            try:
                exact = packmask.verify(tiny_model(family, "packmask", dtype=torch.float64), reference_impl="sdpa",
                                        tol=1e-6, print_table=False)  # transformers' loss upcasts to fp32
            except Exception as e:  # noqa: BLE001
                exact = None
                row["status"] = "near-pass"
                row["reason"] = (f"worst fp32 rel err {worst32:.1e} > 1e-5 (contamination gives > 1e-2); the fp64 "
                                 f"check could not run: {_first_line(e)}")
            if exact is None:
                pass
            elif exact.rows and all(r.error is not None for r in exact.rows):
                row["status"] = "near-pass"
                row["reason"] = (f"worst fp32 rel err {worst32:.1e} > 1e-5 (contamination gives > 1e-2); the fp64 "
                                 f"check could not run: {exact.rows[0].error[:150]}")
            elif exact.passed:
                row["status"] = "pass"
                row["reason"] = (f"fp32 rounding: worst fp32 rel err {max(v for v in w.values() if v is not None):.1e} "
                                 f"> 1e-5, fp64 logits rel err {exact.worst()['output']:.0e} and grads "
                                 f"{exact.worst()['grad']:.0e} (transformers computes the loss in fp32)")
            else:
                row["status"] = "FAIL"
                row["reason"] = f"differs in fp64 too: {exact.summary()}"
        else:
            bad = [r for r in report.rows if not r.passed]
            row["status"] = "error" if all(r.error is not None for r in bad) else "FAIL"
            row["reason"] = "; ".join(f"{r.form}: {r.error or f'out {r.output_rel_err:.1e} grad {r.grad_rel_err:.1e} ({r.grad_param})'}"
                                      for r in bad)[:400]
        from packmask.recurrent import installed
        mixers = sorted({type(m).__name__ for name, m in model.named_modules() if name in (installed(model) or [])})
        if mixers and row["status"] == "pass":  # recurrent: exact because packmask.recurrent runs them per sequence
            row["recurrent"] = mixers
            row["reason"] = (f"{', '.join(mixers)} run once per packed sequence (packmask.recurrent). "
                             + row["reason"]).strip()
        elif row.get("multimodal") and row["status"] == "pass":
            row["reason"] = ("packed with packmask.MultimodalCollator, see docs/multimodal.md (preference data as "
                             "shared-prefix trees: MultimodalTreeCollator, docs/preference.md)")
        elif guard and row["status"] != "refused":
            row["reason"] = (row["reason"] + f" [guard registry says: {guard}]").strip()
    except _Timeout:
        row.update(status="timeout", reason=f"verify took longer than {timeout} s")
    except Exception as e:  # noqa: BLE001
        row.update(status="error", reason=_first_line(e) + " @ " + traceback.format_exc().strip().splitlines()[-3][:120])
    finally:
        signal.alarm(0)
        row["seconds"] = round(time.time() - t0, 1)
    return row


def _build_model(family: str, row: dict):
    """The tiny packmask model of ``family``, or None with ``row``'s status and reason set. Composite
    vision-language families that packmask.multimodal packs are built by ``tiny_vlm`` (their ``verify``
    runs the MultimodalCollator comparison); other composite families are skipped."""
    import packmask
    from packmask.multimodal.families import FAMILIES as VLM_RULES
    from packmask.testing import tiny_config, tiny_model

    if family in VLM_RULES:
        from packmask.multimodal.tiny import tiny_vlm

        row["multimodal"] = True
        return tiny_vlm(family)
    try:
        config = tiny_config(family)
    except Exception as e:  # noqa: BLE001
        row.update(status="unbuildable", reason=f"config: {_first_line(e)}")
        return None
    if getattr(config, "is_encoder_decoder", False):
        row.update(status="skipped", reason="encoder-decoder model, not decoder-only")
        return None
    encoder = _encoder_family(family, config)
    if encoder:
        row.update(status="skipped", reason=encoder)
        return None
    media = sorted(k for k in getattr(config, "sub_configs", {}) if any(
        w in k for w in ("vision", "audio", "image", "vq", "speech", "depth", "vit")))
    if media:
        row.update(status="skipped", reason=f"multimodal ({', '.join(media)}): needs media inputs and "
                                            f"full-size towers (text decoders transformers lists as families of their own, "
                                            f"e.g. gemma3_text, have their own rows)")
        return None
    try:
        model = tiny_model(family, "packmask")
    except Exception as e:  # noqa: BLE001
        # some families pick attention classes by name at construction (gpt_neo: KeyError 'packmask');
        # build them on eager and switch, as a user with an existing model would
        try:
            model = packmask.enable(tiny_model(family, "eager"))
            row["reason"] = f"built on eager then switched (constructing with packmask: {_first_line(e)})"
        except packmask.UnsupportedModelError as refusal:
            row.update(status="refused", reason=f"constructing with packmask: {_first_line(e)}; "
                                                f"packmask.enable on an eager model: {_first_line(refusal)}")
            return None
        except Exception:  # noqa: BLE001
            row.update(status="unbuildable", reason=f"tiny model: {_first_line(e)}")
            return None
    return model


def _encoder_family(family, config) -> str:
    """A reason to skip BERT-style encoders that transformers also lists as causal LMs (via is_decoder)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if family in MODEL_FOR_MASKED_LM_MAPPING_NAMES and hasattr(config, "is_decoder") and not config.is_decoder:
        return ("encoder (BERT-style, bidirectional; a causal LM only with is_decoder=True): packed as an encoder, "
                "see tests/models/test_encoders.py")
    return ""


def _families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from packmask.multimodal.families import FAMILIES as VLM_RULES

    # the vision-language families packmask.multimodal packs, also those transformers lists only as
    # image-text-to-text models
    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) + [f for f in VLM_RULES if f not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]


def _fmt(v):
    return "" if v is None else f"{v:.1e}"


def render(rows: list[dict], elapsed: float) -> str:
    import torch
    import transformers

    order = {"pass": 0, "refused": 1, "near-pass": 2, "FAIL": 3, "error": 4, "timeout": 5, "unbuildable": 6,
             "skipped": 7}
    rows = sorted(rows, key=lambda r: (order.get(r["status"], 9), r["family"]))
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    built = [r for r in rows if r["status"] not in ("unbuildable", "skipped")]
    with_pos = [r for r in built if r.get("takes_position_ids")]
    pos_pass = sum(r["status"] == "pass" for r in with_pos)
    packable = [r for r in with_pos if r["status"] != "refused"]
    wrong = [r for r in built if r["status"] == "FAIL"]
    recurrent = [r for r in built if r.get("recurrent_family") or r.get("recurrent")]
    recurrent_pass = [r for r in recurrent if r["status"] == "pass"]
    multimodal = [r for r in built if r.get("multimodal")]
    multimodal_pass = [r for r in multimodal if r["status"] == "pass"]
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    lines = [
        "# Model support",
        "",
        f"Generated by `{COMMAND}` (the whole matrix, ~{max(1, round(elapsed / 60))} min on 2 CPU processes) on "
        f"{today} with transformers {transformers.__version__}, torch {torch.__version__}. Do not edit by hand.",
        "",
        "Every family of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` is built offline as a tiny random fp32 model "
        "(`packmask.testing.tiny_model(family)`, `attn_implementation=\"packmask\"`) and run through "
        "`packmask.verify`: two packed rows of documents [[5, 9, 4], [11, 6]] in three input forms (3D mask, "
        "4D mask + position_ids, `DataCollatorWithFlattening` keys) against each document run alone with "
        "`eager`; logits, loss and every parameter gradient within relative error 1e-5. The vision-language "
        "families `packmask.multimodal` packs (also those transformers lists only as image-text-to-text models) are "
        "built by `packmask.multimodal.tiny.tiny_vlm` and verified the same way with `MultimodalCollator` rows of "
        "samples with 0-2 images (one row and two rows; the vision tower's gradients included).",
        "",
        f"**Summary:** {pos_pass}/{len(packable)} ({100 * pos_pass / max(1, len(packable)):.0f}%) of the buildable "
        f"families whose forward takes `position_ids` and that attention masks can isolate pass; counting the "
        f"{len(with_pos) - len(packable)} refused ones too (sparse-attention indexers, attention outside "
        f"transformers' interface, ...), {pos_pass}/{len(with_pos)} "
        f"({100 * pos_pass / max(1, len(with_pos)):.0f}%). "
        + ", ".join(f"{counts.get(k, 0)} {k}" for k in order if counts.get(k)) + f" of {len(rows)} families. "
        + (f"**{len(wrong)} silently wrong: {', '.join(r['family'] for r in wrong)}.**" if wrong else
           "No family gives a silently wrong result."),
        "",
        f"**Hybrid and recurrent families** (state-space, linear-attention, RG-LRU, RWKV, xLSTM or short-convolution "
        f"layers): {len(recurrent_pass)}/{len(recurrent)} ({100 * len(recurrent_pass) / max(1, len(recurrent)):.0f}%) "
        f"pass, their recurrent layers run once per packed sequence (`packmask.recurrent`, see docs/hybrid.md): "
        f"{', '.join(r['family'] for r in recurrent_pass) or 'none'}. "
        + ("Refused or failing: " + "; ".join(f"{r['family']} ({r['status']})" for r in recurrent
                                              if r["status"] != "pass") + "." if len(recurrent_pass) < len(recurrent)
           else ""),
        "",
        f"**Vision-language families** (`packmask.multimodal`): {len(multimodal_pass)}/{len(multimodal)} pass, "
        f"packed with `packmask.MultimodalCollator` (docs/multimodal.md): "
        f"{', '.join(r['family'] for r in multimodal_pass) or 'none'}. "
        + ("Failing: " + "; ".join(f"{r['family']} ({r['status']})" for r in multimodal if r["status"] != "pass") + ". "
           if len(multimodal_pass) < len(multimodal) else "")
        + "Other composite multimodal families are skipped below.",
        "",
        "Statuses:",
        "",
        "- **pass** — packed == each sequence alone (logits, loss, gradients), all three forms. For hybrid and "
        "recurrent families the reason names the layers packmask runs once per packed sequence.",
        "- **refused** — packed input raises `packmask.UnsupportedModelError` naming the reason and the fix "
        "(the model mixes tokens outside attention, or its attention never calls packmask); see "
        "`packmask.support`. State-space / recurrent / indexer models still run ordinary unpacked batches; "
        "models whose attention bypasses transformers' interface are refused on every call with packmask.",
        "- **near-pass** — within 1e-3 but above 1e-5 in fp32 and the fp64 re-check could not run "
        "(contamination between sequences gives errors above 1e-2). A fp32 near miss that is exact in fp64 "
        "(reference on `sdpa`, since transformers' eager takes its softmax in fp32) counts as **pass**, with the "
        "fp32 numbers in the reason.",
        "- **FAIL** — a wrong result (a bug: report it). **error** — another exception (listed with it).",
        "- **unbuildable** — cannot be built offline from a tiny config (needs a checkpoint or special "
        "inputs); **skipped** — not a decoder-only text causal LM: encoder-decoder, multimodal composite without a "
        "`packmask.multimodal` packing rule (its text decoder is its own row), or a BERT-style encoder (packed as an encoder: `tests/models/test_encoders.py`).",
        "",
        "Check any model yourself, including your own checkpoint: `packmask verify --model FAMILY|PATH` or "
        "`packmask.verify(model)`.",
        "",
        "| family | class | status | logits rel err | loss rel err | grad rel err | reason |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        reason = (r.get("reason") or "").replace("|", "\\|").replace("\n", " ")
        if r["status"] == "refused" and r.get("unpacked") not in (None, "ok"):
            if r["unpacked"].startswith("UnsupportedModelError"):
                reason += " Refused on every call, unpacked too (packmask never runs inside this model)."
            else:
                reason += f" (an unpacked batch fails in transformers itself: {r['unpacked'][:120]})"
        lines.append(f"| {r['family']} | {r.get('model_class', '')} | {r['status']} | {_fmt(r.get('output'))} | "
                     f"{_fmt(r.get('loss'))} | {_fmt(r.get('grad'))} | {reason} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", help="comma-separated model_types (default: every causal LM family)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--timeout", type=int, default=60, help="seconds per family (default 60)")
    ap.add_argument("--output", default=str(DEFAULT_OUTPUT), help="markdown file, or - for stdout")
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument("--render", metavar="JSON", help="only re-render the page from rows saved with --json")
    args = ap.parse_args(argv)
    if args.render:
        data = json.loads(Path(args.render).read_text())
        text = render(data["rows"], data["seconds"])
        Path(args.output).write_text(text) if args.output != "-" else sys.stdout.write(text)
        return 0
    families = args.families.split(",") if args.families else _families()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    t0 = time.time()
    rows = []
    ctx = mp.get_context("spawn")
    with ctx.Pool(max(1, min(args.jobs, 2)), maxtasksperchild=25) as pool, Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[last]}"), transient=False) as progress:
        task = progress.add_task("verifying", total=len(families), last="")
        pending = {f: pool.apply_async(check_family, (f, args.timeout)) for f in families}
        for family, result in pending.items():
            try:
                row = result.get(timeout=args.timeout + 30)
            except mp.TimeoutError:
                row = dict(family=family, status="timeout", reason=f"no answer within {args.timeout + 30} s")
            except Exception as e:  # noqa: BLE001 — the worker died
                row = dict(family=family, status="error", reason=f"worker: {_first_line(e)}")
            rows.append(row)
            if args.json:
                with open(args.json + ".partial", "a") as f:
                    f.write(json.dumps(row) + "\n")
            progress.update(task, advance=1, last=f"{family}: {row['status']}")
    text = render(rows, time.time() - t0)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, seconds=time.time() - t0), indent=1))
    print(text.split("**Summary:**", 1)[1].split("\n", 1)[0].strip() if "**Summary:**" in text else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
