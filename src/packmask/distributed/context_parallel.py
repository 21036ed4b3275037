"""Context parallelism: one long packed row split over several ranks, exact in forward and backward.

Usage (every rank of the context group receives the *same* full batch; ``torchrun`` launches)::

    import packmask
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cuda", (dp, cp), mesh_dim_names=("data", "context"))
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="packmask")
    with packmask.context_parallel(mesh, model=model) as ctx:
        local = ctx.shard(batch)          # input_ids, labels, seq_lengths / position_ids / ... of full rows
        out = model(**local)              # this rank's N / cp tokens of every row
        out.loss.backward()               # this rank's share of the globally normalised loss
        ctx.all_reduce_gradients(model)   # or DDP / FSDP2 over the whole mesh (see below)
        loss = ctx.reduce(out.loss)       # the loss of the whole batch, equal to one process's
        logits = ctx.gather(out.logits)   # [B, N, V] in row order (only if you need them)

What happens:

1. :meth:`ContextParallel.shard` turns the batch's document boundaries into a
   :class:`~packmask.distributed.cp_plan.ShardPlan` (zig-zag for long documents, whole short
   documents, cost-balanced; see :mod:`~packmask.distributed.cp_plan`), and hands each rank its
   tokens, their position ids (positions inside their document, as in the unsplit row) and
   labels **already shifted over the whole row** (the next token may live on another rank), plus
   ``num_items_in_batch`` = the label count of the whole batch over every rank, so each rank's
   ``out.loss`` is its share of the globally normalised loss.
2. The local batch carries a :class:`~packmask.distributed.cp_attention.ContextParallelLayout`
   under the model keyword ``packmask_layout`` (:data:`packmask.inputs.LAYOUT_KWARG`).
   transformers forwards it to every attention call, where packmask runs it: all-gather K/V over
   the context group, attend this rank's queries to the keys of their documents; the backward
   reduce-scatters dK/dV.
3. Gradients are a sum over ranks: every rank's loss is divided by the *global* count, so
   summing gradients (``all_reduce_gradients``) gives exactly the single-process gradient. DDP and
   FSDP2 *average* over their ``W`` ranks instead: backpropagate ``out.loss * ctx.world_size`` (on
   NCCL, FSDP2's ``model.set_gradient_divide_factor(1.0)`` does the same; gloo lacks the
   ``PREMUL_SUM`` it needs).

Not supported: a KV cache / generation (``use_cache`` is forced off), masks that are not
block-diagonal (prefix-LM, trees), bidirectional sliding windows, attention sinks, models with
recurrent / state-space layers (refused by name), and models whose forward does not pass its
keywords on to attention (refused at the first layer while the context is active).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import PackmaskError, UnsupportedModelError
from ..forward_inputs import NAME, uses_packmask
from ..inputs import LAYOUT_KWARG, require_external_layout, resolve_layout
from ..layout import DocumentLayout
from ..segments import starts_from_ids
from ..support import unsupported_reason
from .cp_attention import ContextParallelLayout, all_gather_sequence
from .cp_plan import ShardPlan, plan_context_parallel

__all__ = ["ContextParallel", "context_parallel"]

_BOUNDARY_KEYS = ("attention_mask", "seq_lengths", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _groups(mesh, dim: str):
    """(context group, other groups to reduce over) of a DeviceMesh / ProcessGroup / None (= world)."""
    from torch.distributed.device_mesh import DeviceMesh
    if isinstance(mesh, DeviceMesh):
        if mesh.ndim == 1:
            return mesh.get_group(), []
        names = mesh.mesh_dim_names or ()
        if dim not in names:
            raise PackmaskError(f"the device mesh has dimensions {names}; name the context-parallel one {dim!r} "
                                f"(init_device_mesh(..., mesh_dim_names=('data', {dim!r}))) or pass dim=.")
        return mesh.get_group(dim), [mesh.get_group(n) for n in names if n != dim]
    if mesh is None:
        return dist.group.WORLD, []
    return mesh, []


def _layout_of(batch: dict, B: int, N: int) -> DocumentLayout:
    """The document boundaries of a full batch, from whichever key carries them
    (:func:`packmask.inputs.resolve_layout`, on the host); a row without any is one sequence."""
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
        raise PackmaskError(
            "a 2D padding attention_mask cannot be context-parallel: pack the rows and pass seq_lengths (padding "
            "becomes a document of its own with label -100), e.g. from packmask.PackedCollator.")
    on_host = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k in _BOUNDARY_KEYS
               or k == "position_ids"}
    if isinstance(on_host.get("attention_mask"), torch.Tensor) and on_host["attention_mask"].dim() == 2:
        on_host.pop("attention_mask")  # no padding (checked above): nothing to read
    layout = resolve_layout(B, N, **on_host)
    if layout is None:  # no boundaries given, or one sequence per row
        return DocumentLayout.from_seq_lengths([[N]] * B, N)
    if not isinstance(layout, DocumentLayout):
        raise PackmaskError(
            "context parallelism splits packed documents; this attention_mask is not block-diagonal (prefix-LM, "
            "tree or other mask). Train these rows without context parallelism.")
    return layout


def shift_labels(labels: torch.Tensor, doc_ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Labels moved one token left inside each document: what the token at ``t`` predicts.

    >>> shift_labels(torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[0, 0, 0, 1, 1]])).tolist()
    [[6, 7, -100, 9, -100]]
    """
    out = torch.full_like(labels, ignore_index)
    same = ~starts_from_ids(doc_ids.to(labels.device))[:, 1:]  # token t + 1 continues t's document
    out[:, :-1] = torch.where(same, labels[:, 1:], torch.full_like(labels[:, 1:], ignore_index))
    return out


class ContextParallel:
    """Shards packed batches over the context dimension of a device mesh; see the module docstring.

    Args:
        mesh: a ``DeviceMesh`` (1-D, or with a dimension named ``dim``; the other dimensions are
            data parallel), a process group, or ``None`` for the whole world.
        model: the model to check (refuses families whose sequence mixing is not all attention,
            and models not on ``attn_implementation="packmask"``); its sliding window, if any,
            steers the balance.
        split_threshold, strategy: see :func:`~packmask.distributed.cp_plan.plan_context_parallel`.
        dim: name of the context dimension of ``mesh``.
    """

    def __init__(self, mesh=None, *, model=None, split_threshold: int | None = None, strategy: str = "balanced",
                 dim: str = "context"):
        if not dist.is_available() or not dist.is_initialized():
            raise PackmaskError("context parallelism needs torch.distributed: launch with torchrun and call "
                                "torch.distributed.init_process_group (or init_device_mesh) first.")
        self.group, self.data_groups = _groups(mesh, dim)
        self.cp = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.world_size = self.cp
        for g in self.data_groups:
            self.world_size *= dist.get_world_size(g)
        self.split_threshold, self.strategy = split_threshold, strategy
        self.window = None
        self.plan: ShardPlan | None = None
        self._labels = None
        if model is not None:
            self._check_model(model)
            window = getattr(getattr(model, "config", None), "sliding_window", None)
            self.window = window if isinstance(window, int) and window > 0 else None

    @staticmethod
    def _check_model(model) -> None:
        reason = unsupported_reason(model)
        if reason:
            raise UnsupportedModelError(f"packmask cannot shard this model over context-parallel ranks: {reason} "
                                        f"Train it without context parallelism.")
        if not uses_packmask(model):
            raise PackmaskError(f"{type(model).__name__} runs attn_implementation="
                                f"{getattr(model.config, '_attn_implementation', None)!r}; context parallelism runs "
                                f"through packmask: build it with attn_implementation={NAME!r} or packmask.enable(model).")

    # ---- the context: attention without the CP layout is refused while it is active ---------------
    def __enter__(self) -> "ContextParallel":
        self._required = require_external_layout()  # per thread / task (a ContextVar), like packmask.backend
        self._required.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._required.__exit__(*exc)

    # ---- batches ----------------------------------------------------------------------------------
    def _check_same_batch(self, layout: DocumentLayout, ref: torch.Tensor) -> None:
        """Every rank of the context group must shard the same rows: compare a fingerprint (one tiny all-reduce)."""
        cu = layout.cu_seqlens.to(torch.float64)
        fp = torch.stack([torch.tensor(float(layout.batch_size)), torch.tensor(float(layout.seq_len)),
                          (cu * torch.arange(1, len(cu) + 1, dtype=torch.float64)).sum(),
                          ref.detach().to(torch.float64).sum().cpu()])
        both = torch.cat([fp, -fp]).to(_comm_device(self.group))
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        if not torch.equal(both[:4], -both[4:]):
            raise PackmaskError(
                "the ranks of one context-parallel group were given different batches: every rank of the group must "
                "call shard() with the same full rows (load the data per data-parallel rank, not per context rank).")

    def shard(self, batch: dict, *, num_items_in_batch: int | torch.Tensor | None = None) -> dict:
        """This rank's part of a batch of full packed rows ``[B, N]`` (see the module docstring).

        Document boundaries come from ``seq_lengths``, ``cu_seq_lens_q``, a block-diagonal
        ``attention_mask`` or ``position_ids`` (in that order); without any, each row is one sequence.
        ``N`` must be a multiple of the context size. ``num_items_in_batch``: the loss divisor; by
        default the predicted tokens of this batch summed over the data-parallel ranks. With gradient
        accumulation pass the count of the whole optimizer step, e.g.
        ``packmask.distributed.count_loss_items(micro_batches, group=<data group>)`` over full rows.
        """
        ref = batch.get("input_ids")
        ref = ref if ref is not None else batch.get("inputs_embeds")
        if ref is None:
            raise PackmaskError("shard() needs input_ids (or inputs_embeds) of shape [batch, tokens].")
        B, N = ref.shape[:2]
        layout = _layout_of(batch, B, N)
        plan = plan_context_parallel(layout, self.cp, split_threshold=self.split_threshold, window=self.window,
                                     strategy=self.strategy)
        self._check_same_batch(layout, ref)
        local = {}
        for key, value in batch.items():
            if key in _BOUNDARY_KEYS or key in ("labels", "position_ids"):
                continue
            if isinstance(value, torch.Tensor) and value.shape[:2] == (B, N):
                value = plan.local(self.rank, value)
            local[key] = value
        positions = batch.get("position_ids")
        positions = layout.position_ids if positions is None else positions.expand(B, N)
        local["position_ids"] = plan.local(self.rank, positions.to(ref.device))
        labels = batch.get("labels")
        if labels is not None:
            shifted = plan.local(self.rank, shift_labels(labels, plan.doc_ids))
            local["labels"] = local["shift_labels"] = shifted
            if num_items_in_batch is None:
                count = (shift_labels(labels, plan.doc_ids) != -100).sum().to(torch.float32).reshape(1)
                num_items_in_batch = self._sum_over_data(count.to(_comm_device(self.group)))[0]
            local["num_items_in_batch"] = torch.as_tensor(num_items_in_batch).to(ref.device)
            self._labels = (shifted, local["num_items_in_batch"])
        local["use_cache"] = False
        local[LAYOUT_KWARG] = ContextParallelLayout(plan, self.rank, self.group)
        self.plan = plan
        return local

    def _sum_over_data(self, t: torch.Tensor) -> torch.Tensor:
        for g in self.data_groups:
            dist.all_reduce(t, group=g)
        return t

    # ---- results ----------------------------------------------------------------------------------
    def gather(self, local: torch.Tensor, plan: ShardPlan | None = None) -> torch.Tensor:
        """``[B, N // cp, ...]`` per rank -> the full ``[B, N, ...]`` in row order.

        Differentiable, with the all-gather's backward: each rank's part receives the *sum* of
        every rank's gradient. If every rank computes the same loss from the gathered tensor,
        divide that loss by ``cp`` (or, simpler, backpropagate each rank's own ``out.loss``)."""
        plan = plan or self.plan
        if plan is None:
            raise PackmaskError("gather() needs a plan: call shard() first (or pass plan=).")
        return plan.unshard(all_gather_sequence(local, self.group))

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """This rank's share of the globally normalised per-token loss, from its ``[B, N // cp, V]``
        logits and the labels of the last ``shard()`` — the same as ``out.loss`` of models whose loss
        takes transformers' ``shift_labels``; use it for models that compute their loss themselves
        (and then do not pass ``labels`` to the model: they would be shifted a second time)."""
        if getattr(self, "_labels", None) is None:
            raise PackmaskError("loss() needs the labels of a batch: call shard() with labels first.")
        labels, count = self._labels
        per_token = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                      labels.reshape(-1).to(logits.device), ignore_index=-100,
                                                      reduction="sum")
        return per_token / count.to(per_token.device)

    def reduce(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of a (detached) scalar over every rank of the mesh: the whole batch's loss from each
        rank's ``out.loss``."""
        total = value.detach().clone().reshape(1).to(_comm_device(self.group))
        dist.all_reduce(total, group=self.group)
        return self._sum_over_data(total)[0].to(value.device)

    def all_reduce_gradients(self, model) -> None:
        """Sum every parameter gradient over the mesh (without DDP / FSDP). One flat bucket per dtype."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        for dtype in {g.dtype for g in grads}:
            same = [g for g in grads if g.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in same])
            dist.all_reduce(flat, group=self.group)
            self._sum_over_data(flat)
            offset = 0
            for g in same:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()


def _comm_device(group) -> torch.device:
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def context_parallel(mesh=None, *, model=None, split_threshold: int | None = None, strategy: str = "balanced",
                     dim: str = "context") -> ContextParallel:
    """``with packmask.context_parallel(mesh, model=model) as ctx: ...`` — see :class:`ContextParallel`."""
    return ContextParallel(mesh, model=model, split_threshold=split_threshold, strategy=strategy, dim=dim)
