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

import gzip
import json
import platform
import random
import time
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path

__all__ = [
    "DemoConfig",
    "load_demo_corpus",
    "build_demo_tokenizer",
    "tokenize_documents",
    "tiny_llama",
    "per_sequence_losses",
    "padded_step",
    "packed_step",
    "run_demo",
]

CORPUS_FILE = "stdlib_docstrings.jsonl.gz"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


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


# --------------------------------------------------------------------------- data

def load_demo_corpus() -> list[dict]:
    """The embedded corpus: ``[{"source": "json.dumps", "text": "Serialize ``obj`` ..."}, ...]``.

    >>> docs = load_demo_corpus()
    >>> len(docs) > 3000 and sorted(docs[0])
    ['source', 'text']
    """
    path = resources.files("packmask.cli") / "corpus" / CORPUS_FILE
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def build_demo_tokenizer(texts: list[str] | None = None, vocab_size: int = 1536):
    """A byte-level BPE tokenizer trained offline on ``texts`` (default: the demo corpus).

    Byte-level means every string round-trips, whatever its characters. Training is
    deterministic for the same texts and vocabulary size, and takes well under a second on the
    demo corpus, so callers rebuild it instead of caching files.

    >>> tok = build_demo_tokenizer()
    >>> ids = tok("Return the sum of a and b.")["input_ids"]
    >>> tok.decode(ids)
    'Return the sum of a and b.'
    >>> tok.eos_token, tok.pad_token
    ('<|endoftext|>', '<|pad|>')
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if texts is None:
        texts = [doc["text"] for doc in load_demo_corpus()]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, model_max_length=1 << 20
    )


def tokenize_documents(tokenizer, texts: list[str], max_length: int | None = None) -> list[list[int]]:
    """Token ids of each text followed by EOS, truncated to ``max_length`` (EOS kept last).

    >>> tok = build_demo_tokenizer()
    >>> [ids[-1] == tok.eos_token_id for ids in tokenize_documents(tok, ["a b", "c"], 8)]
    [True, True]
    """
    eos = tokenizer.eos_token_id
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if max_length is None:
        return [ids + [eos] for ids in encoded]
    return [ids[: max_length - 1] + [eos] for ids in encoded]


def tiny_llama(config: DemoConfig, attn_implementation: str):
    """A randomly initialised Llama small enough to train on a laptop CPU in seconds.

    The weights depend only on ``config.seed``: two calls give identical models whatever the
    attention implementation, which is what makes the padded and packed runs comparable.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    model_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_length,
        tie_word_embeddings=True,
        use_cache=False,
    )
    torch.manual_seed(config.seed)
    return AutoModelForCausalLM.from_config(model_config, attn_implementation=attn_implementation)


# --------------------------------------------------------------------------- batches & losses

def per_sequence_losses(logits, labels, position_ids) -> list[float]:
    """Mean next-token loss of every sequence in a packed batch (sequences with a target).

    Same scoring as :func:`packmask.packed_causal_lm_loss` (shifted, ``-100`` skipped, nothing
    scored across a boundary), but one number per sequence instead of one per batch: that is
    what gets compared with each sequence run alone.
    """
    import torch
    import torch.nn.functional as F

    from ..data.loss import sequence_ids

    B, N, V = logits.shape
    seq = sequence_ids(position_ids=position_ids, shape=(B, N))
    target = labels[:, 1:]
    valid = (target != -100) & (seq[:, 1:] == seq[:, :-1])
    token_losses = F.cross_entropy(logits[:, :-1].float()[valid], target[valid], reduction="none")
    owners = seq[:, :-1][valid]
    count = int(seq.max()) + 1
    sums = torch.zeros(count, device=logits.device).index_add_(0, owners, token_losses)
    tokens = torch.zeros(count, device=logits.device).index_add_(0, owners, torch.ones_like(token_losses))
    return (sums[tokens > 0] / tokens[tokens > 0]).tolist()


def padded_batch(documents: list[list[int]], pad_id: int, device):
    """Right-padded ``input_ids``, 2D ``attention_mask`` and ``labels`` (``-100`` on padding)."""
    import torch

    width = max(len(doc) for doc in documents)
    input_ids = torch.full((len(documents), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(documents), width), dtype=torch.long)
    for row, doc in enumerate(documents):
        input_ids[row, : len(doc)] = torch.tensor(doc)
        attention_mask[row, : len(doc)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


def packed_model_inputs(batch: dict) -> dict:
    """The collated keys a transformers model takes (``labels`` excluded: we score ourselves)."""
    keep = ("input_ids", "position_ids", "attention_mask",
            "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    return {key: batch[key] for key in keep if key in batch}


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}


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


def _documents_of(row: dict) -> list[list[int]]:
    """Split a packed row back into its documents, using ``seq_lengths``."""
    documents, start = [], 0
    for length in row["seq_lengths"]:
        documents.append(row["input_ids"][start : start + length])
        start += length
    return documents


def padded_micro_batches(documents: list[list[int]], token_budget: int) -> list[list[list[int]]]:
    """Consecutive groups of documents whose padded size (count x longest) fits the budget.

    This is how a padded trainer with a token budget batches: documents keep their order, and a
    batch closes when one more document would push ``len(batch) * longest`` over the budget.

    >>> [len(b) for b in padded_micro_batches([[1] * 5, [1] * 5, [1] * 9, [1] * 2], 16)]
    [2, 1, 1]
    """
    batches: list[list[list[int]]] = []
    current: list[list[int]] = []
    longest = 0
    for doc in documents:
        grown = max(longest, len(doc))
        if current and grown * (len(current) + 1) > token_budget:
            batches.append(current)
            current, grown = [], len(doc)
        current.append(doc)
        longest = grown
    if current:
        batches.append(current)
    return batches


# --------------------------------------------------------------------------- runs

def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def padded_step(model, optimizer, documents, pad_id, token_budget, device) -> tuple[float, int]:
    """One padded optimizer step: budgeted micro-batches, gradients accumulated.

    Every micro-batch's loss is divided by the target count of the *whole step*
    (``num_items_in_batch``), so the accumulated gradient is that of one mean over the step --
    the packed step's loss. Returns ``(step_loss, token_slots)``.
    """
    from ..data.loss import packed_causal_lm_loss

    n_targets = sum(len(doc) - 1 for doc in documents)
    step_loss, slots = 0.0, 0
    for micro in padded_micro_batches(documents, token_budget):
        input_ids, attention_mask, labels = padded_batch(micro, pad_id, device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = packed_causal_lm_loss(logits, labels, num_items_in_batch=n_targets)
        loss.backward()
        step_loss += loss.item()
        slots += input_ids.numel()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, slots


def packed_step(model, optimizer, rows, collator, device) -> tuple[float, int]:
    """One packed optimizer step: the rows collated by ``PackedCollator``, one forward.

    Returns ``(step_loss, token_slots)``.
    """
    from ..data.loss import packed_causal_lm_loss

    batch = _to_device(collator(rows), device)
    logits = model(**packed_model_inputs(batch)).logits
    loss = packed_causal_lm_loss(logits, batch["labels"], position_ids=batch["position_ids"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), batch["input_ids"].numel()


@dataclass
class _RunLog:
    losses: list
    seconds: list
    slots: list          # token positions computed (real + padding)
    real_tokens: list


def _summarise(log: _RunLog, warmup: int) -> dict:
    """Throughput over the steps after ``warmup``.

    The first steps pay one-time set-up (on CUDA, kernel compilation for the packed run can take
    seconds), which says nothing about training speed, so they are timed apart.
    """
    warmup = warmup if len(log.seconds) > warmup else 0
    seconds = sum(log.seconds[warmup:])
    real = sum(log.real_tokens[warmup:])
    return {
        "losses": log.losses,
        "step_seconds": log.seconds,
        "real_tokens": sum(log.real_tokens),
        "token_slots": sum(log.slots),
        "padding_fraction": 1 - sum(log.real_tokens) / sum(log.slots),
        "train_seconds": sum(log.seconds),
        "warmup_steps": warmup,
        "warmup_seconds": sum(log.seconds[:warmup]),
        "real_tokens_per_s": real / seconds if seconds > 0 else float("nan"),
    }


def _isolation_check(model, heldout_rows, collator, device):
    """Per-sequence loss of held-out documents packed vs alone, and plain causal for contrast.

    *Alone* is the reference a user trusts: the document by itself, batch of one, ``sdpa``, no
    mask. *Plain causal* runs the same packed rows with no packing information at all, which is
    what concatenating documents without packmask gives: later documents see earlier ones.
    """
    import torch

    import packmask
    from ..data.loss import packed_causal_lm_loss

    model.eval()
    packed_losses, causal_losses, alone_losses = [], [], []
    with torch.no_grad():
        batches = [_to_device(collator([row]), device) for row in heldout_rows]
        for batch in batches:
            logits = model(**packed_model_inputs(batch)).logits
            packed_losses += per_sequence_losses(logits, batch["labels"], batch["position_ids"])

        model.set_attn_implementation("sdpa")
        try:
            for row, batch in zip(heldout_rows, batches):
                # no position_ids, no mask: positions run on across documents, attention too
                logits = model(input_ids=batch["input_ids"]).logits
                causal_losses += per_sequence_losses(logits, batch["labels"], batch["position_ids"])
                for doc in _documents_of(row):
                    doc_ids = torch.tensor([doc], device=device)
                    alone = packed_causal_lm_loss(model(input_ids=doc_ids).logits, doc_ids)
                    alone_losses.append(alone.item())
        finally:
            model.set_attn_implementation(packmask.NAME)

    if len(packed_losses) != len(alone_losses):
        raise RuntimeError(
            f"isolation check found {len(packed_losses)} sequences in the packed rows but "
            f"{len(alone_losses)} documents; the collator's position_ids do not restart at 0 "
            "at every document"
        )
    diff_packed = max(abs(p - a) for p, a in zip(packed_losses, alone_losses))
    diff_causal = max(abs(c - a) for c, a in zip(causal_losses, alone_losses))
    return {
        "documents": len(alone_losses),
        "rows": len(heldout_rows),
        "max_abs_diff_packed_vs_alone": diff_packed,
        "max_abs_diff_plain_causal_vs_alone": diff_causal,
    }


def _cpu_threads_for_a_shared_machine() -> int | None:
    """Fewer torch threads when other processes already keep the cores busy.

    With every core in use elsewhere, a thread of a parallel region waits for its descheduled
    sibling, and a 2-thread step on a 2-core machine became 3-10x slower than with one thread
    (measured). Uses the 1-minute load average; leaves an explicit ``OMP_NUM_THREADS`` alone.
    Returns the thread count it set, or None.
    """
    import os

    import torch

    if "OMP_NUM_THREADS" in os.environ or not hasattr(os, "getloadavg"):
        return None
    cores = os.cpu_count() or 1
    idle_cores = cores - os.getloadavg()[0]
    threads = max(1, min(torch.get_num_threads(), int(idle_cores + 0.5)))
    if threads < torch.get_num_threads():
        torch.set_num_threads(threads)
        return threads
    return None


def _default_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    device = torch.device(device) if device is not None else _default_device()
    reduced_threads = _cpu_threads_for_a_shared_machine() if device.type == "cpu" else None
    if reduced_threads is not None:
        console.print(f"[dim]other processes are busy on this machine: using {reduced_threads} torch "
                      "thread(s) (set OMP_NUM_THREADS to choose)[/]")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
        docs = [doc for row in rows for doc in _documents_of(row)]
        order_rng.shuffle(docs)
        step_documents.append(docs)

    collator = packmask.PackedCollator(pad_token_id=tokenizer.pad_token_id)
    real_per_step = [sum(map(len, docs)) for docs in step_documents]

    # -- training ---------------------------------------------------------------------------
    # The two runs advance in lockstep (padded step i, then packed step i) so that anything else
    # using the machine slows both alike and the throughput comparison stays fair.
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    progress = Progress(
        TextColumn("[bold]{task.description:<7}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:>6}"), TextColumn("{task.fields[tps]:>9} real tok/s"),
        TimeElapsedColumn(), console=console, disable=not show_progress,
    )
    models = {"padded": tiny_llama(config, "sdpa").to(device),
              "packed": tiny_llama(config, packmask.NAME).to(device)}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
                  for name, model in models.items()}
    logs = {name: _RunLog([], [], [], []) for name in models}
    run_step = {
        "padded": lambda i: padded_step(models["padded"], optimizers["padded"], step_documents[i],
                                        tokenizer.pad_token_id, config.tokens_per_step, device),
        "packed": lambda i: packed_step(models["packed"], optimizers["packed"], step_rows[i],
                                        collator, device),
    }
    with progress:
        tasks = {name: progress.add_task(name, total=steps, loss="-", tps="-") for name in models}
        for model in models.values():
            model.train()
        train_started = time.perf_counter()
        for step in range(steps):
            elapsed = time.perf_counter() - train_started
            if config.time_budget_s and step >= 2 and elapsed > config.time_budget_s:
                break
            for name, log in logs.items():
                started = time.perf_counter()
                loss, slots = run_step[name](step)
                _sync(device)
                log.seconds.append(time.perf_counter() - started)
                log.losses.append(loss)
                log.slots.append(slots)
                log.real_tokens.append(real_per_step[step])
                rate = sum(log.real_tokens) / sum(log.seconds)
                progress.update(tasks[name], advance=1, loss=f"{loss:.3f}", tps=f"{rate:,.0f}")

    steps_done = len(logs["packed"].losses)
    if steps_done < steps:
        console.print(f"[yellow]time budget of {config.time_budget_s:.0f} s reached: stopped both runs "
                      f"after {steps_done} of {steps} steps[/] (--time-budget 0 removes the limit)")
    warmup = min(3, steps_done // 5)
    padded = _summarise(logs["padded"], warmup)
    packed = _summarise(logs["packed"], warmup)
    isolation = _isolation_check(models["packed"], heldout_rows, collator, device)
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
    _plot(result, png_path)
    result["wall_seconds"] = time.perf_counter() - wall_started
    json_path.write_text(json.dumps(result, indent=2))
    console.print(results_table(result))
    console.print(
        f"loss curves and throughput → [bold]{png_path}[/]   all numbers → [bold]{json_path}[/]   "
        f"({result['wall_seconds']:.0f} s on {device})"
    )
    return result


# --------------------------------------------------------------------------- report

def results_table(result: dict):
    """The demo's rich table: throughput, padding, losses at equal steps, isolation."""
    from rich.table import Table

    padded, packed = result["padded"], result["packed"]
    steps = len(packed["losses"])
    table = Table(title=f"packmask demo — {steps} steps each, same documents per step, "
                        f"{result['device']}")
    table.add_column("")
    table.add_column("padded (sdpa)", justify="right")
    table.add_column("packed (packmask)", justify="right")
    speedup = packed["real_tokens_per_s"] / padded["real_tokens_per_s"]
    table.add_row("real tokens / s" + (" (after warm-up)" if packed["warmup_steps"] else ""),
                  f"{padded['real_tokens_per_s']:,.0f}",
                  f"{packed['real_tokens_per_s']:,.0f}  ({speedup:.1f}x)")
    table.add_row("padding fraction", f"{padded['padding_fraction']:.1%}",
                  f"{packed['padding_fraction']:.1%}")
    table.add_row("token slots computed", f"{padded['token_slots']:,}", f"{packed['token_slots']:,}")
    warmup = packed["warmup_steps"]
    if warmup:
        def split_time(run):
            return f"{run['warmup_seconds']:.1f} s + {run['train_seconds'] - run['warmup_seconds']:.1f} s"

        table.add_row(f"time: {warmup} warm-up steps + rest", split_time(padded), split_time(packed))
    else:
        table.add_row("training time", f"{padded['train_seconds']:.1f} s", f"{packed['train_seconds']:.1f} s")
    marks = sorted({1, max(1, steps // 2), steps})
    for step in marks:
        table.add_row(f"loss at step {step}", f"{padded['losses'][step - 1]:.4f}",
                      f"{packed['losses'][step - 1]:.4f}")
    first_gap = abs(padded["losses"][0] - packed["losses"][0])
    table.add_row("|loss diff| step 1 / max", "",
                  f"{first_gap:.0e} / {result['max_abs_loss_diff_at_equal_steps']:.0e}")
    iso = result["isolation"]
    table.add_row("max |per-seq loss − alone|",
                  f"{iso['max_abs_diff_plain_causal_vs_alone']:.1e} plain causal",
                  f"{iso['max_abs_diff_packed_vs_alone']:.1e}")
    table.caption = (
        "loss diff: same weights and documents at every step; what remains is float rounding "
        "(different kernels sum in different orders).\n"
        f"per-seq loss: {iso['documents']} held-out documents packed into {iso['rows']} rows vs each "
        "run alone; 'plain causal' = the same rows without packmask (documents see each other)."
    )
    return table


def _plot(result: dict, path: Path) -> None:
    """Two panels: both loss curves over steps, and real tokens/s with the padding fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    padded, packed = result["padded"], result["packed"]
    fig, (ax_loss, ax_tps) = plt.subplots(1, 2, figsize=(11, 4.2),
                                          gridspec_kw={"width_ratios": [2, 1]})
    steps = range(1, len(packed["losses"]) + 1)
    ax_loss.plot(steps, padded["losses"], color="#d62728", lw=3, alpha=0.45, label="padded (sdpa)")
    ax_loss.plot(steps, packed["losses"], color="#1f77b4", lw=1.3, ls="--", label="packed (packmask)")
    ax_loss.set_xlabel("optimizer step (same documents in both runs)")
    ax_loss.set_ylabel("mean next-token cross-entropy")
    ax_loss.set_title(f"loss at equal steps: max |diff| = "
                      f"{result['max_abs_loss_diff_at_equal_steps']:.1e}")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()

    names = ["padded", "packed"]
    rates = [padded["real_tokens_per_s"], packed["real_tokens_per_s"]]
    bars = ax_tps.bar(names, rates, color=["#d62728", "#1f77b4"])
    for bar, run in zip(bars, (padded, packed)):
        ax_tps.annotate(f"{bar.get_height():,.0f}\n{run['padding_fraction']:.0%} padding",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=9)
    ax_tps.set_ylim(0, max(rates) * 1.25)
    ax_tps.set_ylabel("real (non-padding) tokens / s, after warm-up")
    ax_tps.set_title(f"throughput on {result['device']}")
    iso = result["isolation"]
    fig.suptitle(
        f"packmask demo: tiny Llama on {result['corpus']['documents']:,} stdlib docstrings — "
        f"per-sequence loss packed vs alone: max |diff| {iso['max_abs_diff_packed_vs_alone']:.1e} "
        f"(plain causal: {iso['max_abs_diff_plain_causal_vs_alone']:.1e})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
