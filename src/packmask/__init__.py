"""packmask: packed rows and per-sample ``[B, N, N]`` attention masks for any transformers model.

``import packmask`` registers the attention implementation ``"packmask"`` with transformers'
public ``AttentionInterface`` and ``AttentionMaskInterface``.
"""
from __future__ import annotations

import importlib

__version__ = "0.2.0"

from .backends import backend
from .errors import PackmaskError, PackmaskWarning, UnsupportedModelError
from .guards import configure
from .integration import NAME, enable
from .layout import DocumentLayout, GeneralLayout, analyse_mask, position_ids_from_mask
from .layout_tree import TreeLayout
from .masks import block_diagonal_mask, prefix_lm_mask, shared_prefix_tree_mask, tree_mask, tree_mask_from_segments

# name -> module that defines it; imported on first use so `import packmask` stays light.
_LAZY = {
    # packing pipeline
    "pack_dataset": "packmask.data.packing",
    "pack_lengths": "packmask.data.packing",
    "pack_iterable": "packmask.data.streaming",
    "PackingStats": "packmask.data.packing",
    "PackAssignment": "packmask.data.packing",
    "sequence_ids": "packmask.data.loss",
    "PackedCollator": "packmask.data.collator",
    "packed_causal_lm_loss": "packmask.data.loss",
    # shared-prefix trees (preference / RL)
    "pack_preference": "packmask.data.preference",
    "pack_groups": "packmask.data.preference",
    "TreePackingStats": "packmask.data.preference",
    "TreeCollator": "packmask.data.tree_collator",
    "branch_logps": "packmask.data.logps",
    "conversation_forest": "packmask.data.agentic",  # multi-turn agent trajectories as trees
    "pack_conversations": "packmask.data.agentic",
    # chat data
    "tokenize_messages": "packmask.data.chat",
    "tokenize_chat_dataset": "packmask.data.chat",
    # vision-language models  # multimodal:
    "MultimodalCollator": "packmask.multimodal.collator",
    "pack_samples": "packmask.multimodal.collator",
    "pack_image_text": "packmask.multimodal.packed",  # image-text records through a processor, packed ahead
    "load_packed_image_text": "packmask.multimodal.packed",
    "MultimodalTreeCollator": "packmask.multimodal.tree",  # VLM preference / group data as shared-prefix trees
    # proof tool
    "verify": "packmask.verification",
    # context parallelism (torch.distributed)
    "context_parallel": "packmask.distributed.context_parallel",
    "ContextParallel": "packmask.distributed.context_parallel",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'packmask' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    # the lazy names too, so tab completion and dir(packmask) show the whole public API
    return sorted(set(globals()) | set(_LAZY))
