"""``packmask demo``: the whole job on an embedded corpus, packed and padded side by side.

Nothing is downloaded. The package ships ``data/stdlib_docstrings.jsonl.gz`` (about 4.8k
docstrings of the Python standard library, PSF-2.0, from one line to several paragraphs). The demo

1. trains a byte-level BPE tokenizer on it with the ``tokenizers`` library (deterministic, well
   under a second, so it is rebuilt rather than cached) and wraps it as a
   :class:`transformers.PreTrainedTokenizerFast`;
2. packs the training documents into rows of ``max_length`` tokens with
   :func:`packmask.pack_dataset` and shuffles the rows with the seed;
3. trains two identical tiny :class:`~transformers.LlamaForCausalLM` (same seed, same weights)
   for the same number of AdamW steps on **the same documents at every step**:

   * *padded*: ``attn_implementation="sdpa"``, the step's documents in micro-batches padded to
     their longest member with a 2D attention mask, each micro-batch no larger than the packed
     step (``rows_per_step * max_length`` token slots), gradients accumulated;
   * *packed*: ``attn_implementation="packmask"``, the step's packed rows collated by
     :class:`packmask.PackedCollator`.

   Both losses are the mean next-token cross-entropy over the same target tokens, so the two loss
   curves must coincide (up to float rounding) while packed processes far fewer token slots;
4. checks isolation on held-out documents: the per-sequence loss of each document inside a packed
   row against the same document run alone (plain ``sdpa``, batch of one). The same rows run with
   plain causal attention (what packing without packmask gives) are reported for contrast;
5. prints a table, writes ``demo.png`` (loss curves + throughput) and ``demo.json``.

The training runs and the isolation check live in :mod:`packmask.cli.demo_train`.

Worked example (2 CPU cores; numbers vary by machine)::

    >>> from packmask.cli.demo import run_demo  # doctest: +SKIP
    >>> result = run_demo(steps=40, out_dir="packmask-demo")      # doctest: +SKIP
    >>> result["packed"]["real_tokens_per_s"] > result["padded"]["real_tokens_per_s"]  # doctest: +SKIP
    True
    >>> result["isolation"]["max_abs_diff_packed_vs_alone"] < 1e-4  # doctest: +SKIP
    True

or from a shell: ``packmask demo`` (200 steps, writes to ``packmask-demo/``).
"""
from __future__ import annotations

import json
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .demo_corpus import build_demo_tokenizer, load_demo_corpus, tokenize_documents
from .demo_train import (cpu_threads_for_a_shared_machine, default_device, documents_of, isolation_check,
                         packed_step, padded_step, summarise, tiny_llama, train_lockstep)
from .output import AtomicOutputs, json_safe
from .plots import plot_demo
from .report import demo_table

__all__ = ["DemoConfig", "load_demo_corpus", "build_demo_tokenizer", "tokenize_documents", "run_demo"]



@dataclass
class DemoConfig:
    """Everything that shapes a demo run; saved into ``demo.json`` so a run can be repeated."""

    steps: int = 200
    max_length: int = 512          # tokens per packed row; longer documents are truncated
    rows_per_step: int = 2         # packed rows per optimizer step (= the padded token budget)
    seed: int = 0
    vocab_size: int = 1536
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    # 3e-3 trains no faster here and makes training chaotic: float rounding (1e-7) between the
    # two runs then grows to 1e-2 in the loss by step 200; at 1e-3 it stays near 1e-6
    learning_rate: float = 1e-3
    heldout_documents: int = 64    # never trained on; used for the isolation check
    # Training stops (both runs at the same step) once this many seconds have passed, so the demo
    # stays within about two minutes on a slow or busy machine; 0 = no limit.
    time_budget_s: float = 75.0

    @property
    def tokens_per_step(self) -> int:
        return self.rows_per_step * self.max_length


# --------------------------------------------------------------------------- packing

def _pack(token_lists: list[list[int]], max_length: int):
    """``packmask.pack_dataset`` over in-memory token lists; returns ``(rows, stats)``."""
    from datasets import Dataset

    import packmask

    packed, stats = packmask.pack_dataset(
        Dataset.from_dict({"input_ids": token_lists}), max_length, strategy="bfd", return_stats=True
    )
    rows = packed.select_columns(["input_ids", "seq_lengths"]).to_list()
    return rows, stats


def run_demo(
    steps: int = 200,
    out_dir: str | Path = "packmask-demo",
    device=None,
    *,
    config: DemoConfig | None = None,
    console=None,
    show_progress: bool = True,
) -> dict:
    """Run the padded-vs-packed demo; print the table, write ``demo.png`` and ``demo.json``.

    ``steps`` optimizer steps per run (each step is ``rows_per_step`` packed rows of
    ``max_length`` tokens, about 1k real tokens with the defaults). ``device`` defaults to CUDA
    when present, else CPU. Returns the dictionary written to ``demo.json``.
    """
    import torch
    from rich.console import Console

    import packmask  # registers attn_implementation="packmask"

    console = console or Console()
    config = replace(config or DemoConfig(), steps=steps)  # the caller's config is left as it was
    device = torch.device(device) if device is not None else default_device()
    reduced_threads = cpu_threads_for_a_shared_machine() if device.type == "cpu" else None
    if reduced_threads is not None:
        console.print(f"[dim]other processes are busy on this machine: using {reduced_threads} torch "
                      "thread(s) (set OMP_NUM_THREADS to choose)[/]")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"demo.png and demo.json will be written to [bold]{out_dir}{os.sep}[/] "
                  "(packmask demo --out-dir DIR to choose another folder)")
    wall_started = time.perf_counter()

    # -- data: tokenizer, documents, packed rows --------------------------------------------
    corpus = load_demo_corpus()
    texts = [doc["text"] for doc in corpus]
    tokenizer = build_demo_tokenizer(texts, config.vocab_size)
    config = replace(config, vocab_size=len(tokenizer))  # BPE may stop short of the target size
    documents = tokenize_documents(tokenizer, texts, config.max_length)
    random.Random(config.seed).shuffle(documents)
    heldout, training = documents[: config.heldout_documents], documents[config.heldout_documents :]

    pack_started = time.perf_counter()
    train_rows, pack_stats = _pack(training, config.max_length)
    pack_seconds = time.perf_counter() - pack_started
    heldout_rows, _ = _pack(heldout, config.max_length)
    train_tokens = sum(map(len, training))
    console.print(
        f"[bold]corpus[/] {len(corpus):,} stdlib docstrings → {train_tokens:,} tokens "
        f"(BPE vocab {len(tokenizer):,}); packed {len(training):,} documents into "
        f"{len(train_rows):,} rows of {config.max_length} "
        f"(fill {pack_stats.fill:.1%}) in {pack_seconds:.2f} s"
    )

    # the same rows, in the same order, feed both runs; cycle with a reshuffle if steps run out
    order_rng = random.Random(config.seed + 1)
    step_rows = []
    pool: list[dict] = []
    for _ in range(steps):
        if len(pool) < config.rows_per_step:
            refill = list(train_rows)
            order_rng.shuffle(refill)
            pool += refill
        step_rows.append(pool[: config.rows_per_step])
        pool = pool[config.rows_per_step :]
    # The padded run sees each step's documents in random order, as a padded trainer batching
    # shuffled documents would; the packed rows group them by length (best-fit), which would
    # flatter padding. The step's gradient is a sum over its documents, so order does not change it.
    step_documents = []
    for rows in step_rows:
        docs = [doc for row in rows for doc in documents_of(row)]
        order_rng.shuffle(docs)
        step_documents.append(docs)

    collator = packmask.PackedCollator(pad_token_id=tokenizer.pad_token_id)
    real_per_step = [sum(map(len, docs)) for docs in step_documents]

    # -- training: both runs in lockstep ---------------------------------------------------------
    models = {"padded": tiny_llama(config, "sdpa").to(device),
              "packed": tiny_llama(config, packmask.NAME).to(device)}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
                  for name, model in models.items()}
    for model in models.values():
        model.train()
    run_step = {
        "padded": lambda i: padded_step(models["padded"], optimizers["padded"], step_documents[i],
                                        tokenizer.pad_token_id, config.tokens_per_step, device),
        "packed": lambda i: packed_step(models["packed"], optimizers["packed"], step_rows[i], collator, device),
    }
    logs = train_lockstep(run_step, real_per_step, steps, config.time_budget_s, device, console, show_progress)
    steps_done = len(logs["packed"].losses)
    if steps_done < steps:
        console.print(f"[yellow]time budget of {config.time_budget_s:.0f} s reached: stopped both runs "
                      f"after {steps_done} of {steps} steps[/] (--time-budget 0 removes the limit)")
    warmup = min(3, steps_done // 5)
    padded = summarise(logs["padded"], warmup)
    packed = summarise(logs["packed"], warmup)
    isolation = isolation_check(models["packed"], heldout_rows, collator, device)
    loss_gap = max(abs(a - b) for a, b in zip(padded["losses"], packed["losses"]))

    import transformers

    result = {
        "config": asdict(config),
        "device": str(device),
        "torch_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "packmask": getattr(packmask, "__version__", "?"),
                     "python": platform.python_version()},
        "steps_done": steps_done,
        "corpus": {"documents": len(corpus), "training_documents": len(training),
                   "training_tokens": train_tokens, "packed_rows": len(train_rows),
                   "pack_seconds": pack_seconds},
        "padded": padded,
        "packed": packed,
        "max_abs_loss_diff_at_equal_steps": loss_gap,
        "isolation": isolation,
        "wall_seconds": time.perf_counter() - wall_started,
    }
    result["corpus"]["fill"] = float(pack_stats.fill)

    png_path = out_dir / "demo.png"
    json_path = out_dir / "demo.json"
    with AtomicOutputs() as outputs:  # both files appear complete, or neither changes
        plot_demo(result, outputs.stage(png_path))
        result["wall_seconds"] = time.perf_counter() - wall_started
        outputs.stage(json_path).write_text(json.dumps(json_safe(result), indent=2, allow_nan=False))
    console.print(demo_table(result))
    console.print(
        f"loss curves and throughput → [bold]{png_path}[/]   all numbers → [bold]{json_path}[/]   "
        f"({result['wall_seconds']:.0f} s on {device})"
    )
    return result


