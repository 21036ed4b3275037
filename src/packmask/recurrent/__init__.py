"""Exact packing for hybrid and recurrent models: state-space, linear-attention and convolution layers.

A packed row holds several sequences. Attention is isolated per sequence by packmask's mask;
state-space (Mamba, Mamba2), gated-delta-net / linear-attention, RG-LRU, RWKV, xLSTM and short-
convolution layers are not: their state flows from one sequence into the next. This package runs
each such layer (a *mixer*) once per packed sequence, with the layer's own forward on that
sequence's slice, so every sequence starts from a zero state and no convolution reaches across a
boundary. No model-specific math; exact by construction.

* :mod:`~packmask.recurrent.detect` finds the mixers by capability;
* :mod:`~packmask.recurrent.segmented` is the replacement forward of one mixer instance;
* :mod:`~packmask.recurrent.tree_paths`: on shared-prefix tree rows (DPO, GRPO) the mixer runs once
  per root-to-leaf path instead, so every branch starts from the state at the end of its prompt;
* :mod:`~packmask.recurrent.context` carries the forward's layout to the mixers (and replays it
  under activation checkpointing);
* :mod:`~packmask.recurrent.install` puts it on one model instance (automatic for models on
  ``attn_implementation="packmask"``, or ``packmask.enable(model)``).

    tokens          a0 a1 a2 b0 b1        (seq_lengths [[3, 2]])
    attention       mask: a* see a*, b* see b*            (packmask's attention)
    mixer           mixer(a0 a1 a2) | mixer(b0 b1)         (this package)

>>> import torch, packmask
>>> from packmask.testing import tiny_model
>>> model = tiny_model("mamba")
>>> ids = torch.randint(3, 100, (1, 5))
>>> packed = model(input_ids=ids, seq_lengths=[[3, 2]], use_cache=False).logits
>>> alone = torch.cat([model(input_ids=ids[:, :3]).logits, model(input_ids=ids[:, 3:]).logits], 1)
>>> bool(torch.allclose(packed, alone, atol=1e-5))
True
"""
from __future__ import annotations

from .context import current_layout, enter_forward, packed_layout
from .detect import RECURRENT_MODULE_PATTERN, attention_free, find_mixers, recurrent_module_names
from .install import describe_paths, ensure_installed, install, installed, uninstall
from .settings import configure

__all__ = ["configure", "describe_paths", "install", "installed", "uninstall", "ensure_installed", "enter_forward", "current_layout",
           "packed_layout", "find_mixers", "attention_free", "recurrent_module_names", "RECURRENT_MODULE_PATTERN"]
