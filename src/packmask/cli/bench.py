"""``packmask bench``: one training step of a small Llama on packed rows, packmask against
transformers' own sdpa packing, on this machine.

Every method trains the same model (same seed) on the same packed rows:

- ``transformers sdpa`` -- ``attn_implementation="sdpa"`` with packed ``position_ids`` only
  (transformers detects the restarts and builds a block-diagonal mask): the baseline;
- ``packmask collator`` -- ``"packmask"`` with :class:`packmask.PackedCollator`'s keys;
- ``packmask [B,N,N] mask`` -- ``"packmask"`` with a per-sample bool mask;
- ``packmask flex`` / ``transformers flex`` -- GPU only (flex attention has no CPU backward):
  on a CPU each is skipped with one line.

Each method is checked before it is timed: the first row's logits against each of its documents
run alone (``sdpa``, no packing). A method whose relative error exceeds the tolerance makes the
command exit 1. The table also names the kernel packmask's dispatcher chose
(:func:`packmask.backends.choose_backend`) for these inputs. For the full comparison (padding,
dense 4D masks, a contaminated control, long rows) run ``benchmarks/train_step.py``.
"""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

from .errors import EXIT_FAILED
from .output import json_safe  # noqa: F401 (re-exported: the bench JSON uses it)

__all__ = ["cmd_bench", "run_bench"]

GPU_ONLY = {"packmask flex": "flex attention has no backward on CPU", "transformers flex": "flex attention has no backward on CPU"}
METHODS = ("transformers sdpa", "packmask collator", "packmask [B,N,N] mask", "packmask flex", "transformers flex")


def _row_lengths(row_length: int, rows: int, seed: int = 0) -> list[list[int]]:
    """Document lengths per row (log-normal, 8..row_length/2), each row filled to ``row_length``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    result = []
    for _ in range(rows):
        lengths, used = [], 0
        while used < row_length:
            length = int(np.clip(rng.lognormal(np.log(row_length / 8), 0.8), 8, row_length // 2))
            length = min(length, row_length - used)
            lengths.append(length)
            used += length
        result.append(lengths)
    return result


def _model(attn: str, device, dtype, small: bool, row_length: int):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=4096 if small else 32000, hidden_size=256 if small else 1024, intermediate_size=512 if small else 2816,
                         num_hidden_layers=2 if small else 8, num_attention_heads=4 if small else 16,
                         num_key_value_heads=2 if small else 4, max_position_embeddings=row_length,
                         use_cache=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).to(device, dtype)


def _inputs(method: str, input_ids, segments, device) -> dict:
    """The forward's keyword arguments for ``method`` (labels = input_ids; packmask's loss hook
    and transformers' both stop at sequence boundaries through position_ids)."""
    import packmask

    rows = [{"input_ids": ids, "seq_lengths": lengths} for ids, lengths in zip(input_ids.tolist(), segments)]
    batch = packmask.PackedCollator()(rows)
    batch = {key: value.to(device) if hasattr(value, "to") else value for key, value in batch.items()}
    if method == "packmask [B,N,N] mask":
        return {"input_ids": batch["input_ids"], "labels": batch["labels"],
                "attention_mask": packmask.block_diagonal_mask(segments, input_ids.shape[1], device=device)}
    if method.startswith("transformers"):
        return {key: batch[key] for key in ("input_ids", "position_ids", "labels")}
    return batch


def _backend(name: str | None):
    """``packmask.backend(name)`` for a forced backend, else nothing (the dispatcher chooses)."""
    import packmask

    return packmask.backend(name) if name is not None else nullcontext()


def _dispatch(model, batch, device, dtype) -> dict:
    """What packmask's dispatcher picks for this batch in training, and why the others were refused
    (:func:`packmask.backends.describe_choice` on the first layer's shapes)."""
    import torch

    from ..backends import AttentionSpec, choose_backend, describe_choice
    from ..layout import DocumentLayout

    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    B, N = batch["input_ids"].shape
    layout = DocumentLayout.from_position_ids(batch["position_ids"]) if "position_ids" in batch else None
    q = torch.empty(B, config.num_attention_heads, N, head_dim, device=device, dtype=dtype)
    spec = AttentionSpec(scale=head_dim ** -0.5)
    info = describe_choice(layout, spec, q, True)
    info["backend"] = choose_backend(layout, spec, q, True, layers=config.num_hidden_layers)
    return {key: value for key, value in info.items() if isinstance(value, (str, int, float, list, dict))}


def _relative_error(model, batch, reference) -> float:
    import torch

    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0].float()
    return ((logits - reference).norm() / reference.norm()).item()


def _alone_logits(input_ids, lengths, device, dtype, small, row_length):
    """Row 0's documents, each run alone with plain sdpa: the reference every method must match."""
    import torch

    from ..segments import spans_from_lengths

    model = _model("sdpa", device, dtype, small, row_length)
    with torch.no_grad():
        parts = [model(input_ids=input_ids[:1, start : start + length].to(device)).logits[0].float()
                 for _, start, length in spans_from_lengths([lengths], row_length)]
    return torch.cat(parts)


def _timed_step(model, batch, device) -> tuple[float, float | None]:
    """One forward + backward: ``(seconds, GiB the step allocated beyond the resident memory)``;
    the memory is ``None`` off CUDA (not measured)."""
    import torch

    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        resident = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    model(**batch).loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter() - started, (torch.cuda.max_memory_allocated(device) - resident) / 2**30
    return time.perf_counter() - started, None


def run_bench(device=None, steps: int = 5, row_length: int | None = None, console=None) -> dict:
    """Check, then time, every method this device supports; ``{"env": ..., "results": {method: ...}}``.

    Methods are timed in lockstep (step i of every method, then step i + 1), after one warm-up step
    each, and the median step is reported, so other load on the machine slows all of them alike.
    """
    import statistics

    import torch
    import transformers

    import packmask

    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    small = not cuda
    dtype = torch.bfloat16 if cuda else torch.float32
    row_length = row_length or (2048 if cuda else 256)
    segments = _row_lengths(row_length, rows=2)
    input_ids = torch.randint(0, 4096 if small else 32000, (2, row_length), generator=torch.Generator().manual_seed(0))
    reference = _alone_logits(input_ids, segments[0], device, dtype, small, row_length)
    tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-4
    results: dict[str, dict] = {}
    runs = {}  # method -> (model, batch, forced backend)
    for method in METHODS:
        if method in GPU_ONLY and not cuda:
            results[method] = {"skipped": f"needs CUDA ({GPU_ONLY[method]})"}
            if console is not None:
                console.print(f"skipped {method}: needs CUDA ({GPU_ONLY[method]}); this run is on {device}")
            continue
        attn = {"transformers sdpa": "sdpa", "transformers flex": "flex_attention"}.get(method, packmask.NAME)
        forced = "flex" if method == "packmask flex" else None
        model, batch = _model(attn, device, dtype, small, row_length), _inputs(method, input_ids, segments, device)
        with _backend(forced):
            error = _relative_error(model, batch, reference)
            dispatch = _dispatch(model, batch, device, dtype) if attn == packmask.NAME else None
            _timed_step(model, batch, device)  # warm-up: kernel compilation, allocator
        results[method] = {"attention": attn, "packmask_backend": forced or (dispatch or {}).get("backend", "-"),
                           "dispatch": dispatch, "rel_err_vs_alone": error, "passed": error <= tolerance}
        runs[method] = (model, batch, forced)
    timings = {method: [] for method in runs}
    for _ in range(steps):
        for method, (model, batch, forced) in runs.items():
            with _backend(forced):
                timings[method].append(_timed_step(model, batch, device))
    for method, measured in timings.items():
        seconds = statistics.median(t for t, _ in measured)
        results[method].update(step_s=seconds, real_tokens_per_s=input_ids.numel() / seconds,
                               step_gib=max((g for _, g in measured if g is not None), default=None))
    env = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "dtype": str(dtype).replace("torch.", ""),
           "torch": torch.__version__, "transformers": transformers.__version__, "packmask": packmask.__version__,
           "row_length": row_length, "rows": 2, "documents_per_row": [len(s) for s in segments], "steps": steps,
           "tolerance": tolerance, "date": time.strftime("%Y-%m-%d")}
    return {"env": env, "results": results}


def bench_table(report: dict):
    from rich.table import Table

    env, results = report["env"], report["results"]
    base = results.get("transformers sdpa", {}).get("real_tokens_per_s")
    table = Table(title=f"packmask bench — train step, {env['device']}, {env['dtype']}, 2 rows × {env['row_length']} "
                        f"tokens, torch {env['torch']}, transformers {env['transformers']}")
    for name in ("method", "attn", "kernel", "real tok/s", "vs sdpa", "step ms", "step GiB", "rel err", "check"):
        table.add_column(name, justify="left" if name in ("method", "attn", "kernel") else "right", no_wrap=True)
    for method, row in results.items():
        if "skipped" in row:
            continue
        table.add_row(method, row["attention"], row["packmask_backend"], f"{row['real_tokens_per_s']:,.0f}",
                      f"{row['real_tokens_per_s'] / base:.2f}x" if base else "-", f"{row['step_s'] * 1e3:.1f}",
                      "-" if row["step_gib"] is None else f"{row['step_gib']:.2f}",
                      f"{row['rel_err_vs_alone']:.1e}", "pass" if row["passed"] else "[bold red]FAIL[/]")
    table.caption = (f"attn: attn_implementation; kernel: the one packmask's dispatcher chose; vs sdpa: against "
                     f"transformers' sdpa packing; rel err: row 0's logits vs each document alone (tolerance "
                     f"{env['tolerance']:g}); step: median forward + backward of {env['steps']}, methods in lockstep; step GiB: CUDA memory "
                     "a step allocates beyond the weights")
    return table


def cmd_bench(args, console) -> int:
    from .commands import resolve_device
    from .output import AtomicOutputs, json_safe

    report = run_bench(device=resolve_device(args.device), steps=args.steps, row_length=args.row_length, console=console)
    console.print(bench_table(report))
    if args.json:
        with AtomicOutputs() as outputs:
            outputs.stage(Path(args.json)).write_text(json.dumps(json_safe(report), indent=2, allow_nan=False))
        console.print(f"results → [bold]{args.json}[/]")
    failed = [method for method, row in report["results"].items() if row.get("passed") is False]
    if failed:
        console.print(f"[bold red]FAIL[/]: {', '.join(failed)} differ from the documents run alone")
        return EXIT_FAILED
    return 0
