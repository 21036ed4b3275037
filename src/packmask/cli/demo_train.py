"""The demo's two training runs and its isolation check (see :mod:`packmask.cli.demo`).

*padded*: ``attn_implementation="sdpa"``, each step's documents in micro-batches padded to their
longest member (gradients accumulated); *packed*: ``attn_implementation="packmask"``, the step's
packed rows collated by :class:`packmask.PackedCollator`. Both score the same target tokens with
:func:`packmask.packed_causal_lm_loss`, so their losses must agree at every step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["tiny_llama", "per_sequence_losses", "padded_batch", "packed_model_inputs", "documents_of",
           "padded_micro_batches", "padded_step", "packed_step", "train_lockstep", "isolation_check",
           "cpu_threads_for_a_shared_machine"]

def tiny_llama(config, attn_implementation: str):
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


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}


def documents_of(row: dict) -> list[list[int]]:
    """Split a packed row back into its documents, using ``seq_lengths`` (:mod:`packmask.segments`)."""
    from ..segments import spans_from_lengths

    ids = row["input_ids"]
    return [ids[start : start + length] for _, start, length in spans_from_lengths([row["seq_lengths"]], len(ids))]


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

    batch = to_device(collator(rows), device)
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


def summarise(log: _RunLog, warmup: int) -> dict:
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


def isolation_check(model, heldout_rows, collator, device):
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
        batches = [to_device(collator([row]), device) for row in heldout_rows]
        for batch in batches:
            logits = model(**packed_model_inputs(batch)).logits
            packed_losses += per_sequence_losses(logits, batch["labels"], batch["position_ids"])

        model.set_attn_implementation("sdpa")
        try:
            for row, batch in zip(heldout_rows, batches):
                # no position_ids, no mask: positions run on across documents, attention too
                logits = model(input_ids=batch["input_ids"]).logits
                causal_losses += per_sequence_losses(logits, batch["labels"], batch["position_ids"])
                for doc in documents_of(row):
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


def cpu_threads_for_a_shared_machine() -> int | None:
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


def default_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_lockstep(run_step: dict, real_per_step: list[int], steps: int, time_budget_s: float, device,
                   console, show_progress: bool) -> dict:
    """Run ``run_step[name](i)`` for every run, step by step, timing each; returns ``{name: _RunLog}``.

    The runs advance in lockstep (padded step i, then packed step i) so that anything else using
    the machine slows both alike and the throughput comparison stays fair. Once ``time_budget_s``
    (0 = none) has passed, both stop at the same step.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("[bold]{task.description:<7}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:>6}"), TextColumn("{task.fields[tps]:>9} real tok/s"),
        TimeElapsedColumn(), console=console, disable=not show_progress,
    )
    logs = {name: _RunLog([], [], [], []) for name in run_step}
    with progress:
        tasks = {name: progress.add_task(name, total=steps, loss="-", tps="-") for name in run_step}
        train_started = time.perf_counter()
        for step in range(steps):
            if time_budget_s and step >= 2 and time.perf_counter() - train_started > time_budget_s:
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
    return logs

