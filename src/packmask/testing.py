"""Tiny random models and the "each sequence alone" reference, shared by tests, verify and the CLI.

Everything here builds offline from configs: no downloads.
"""
from __future__ import annotations

import functools

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from . import segments
from .errors import PackmaskError

__all__ = ["TINY", "tiny_config", "tiny_model", "run_alone", "pack_rows", "rel_err", "grad_rel_err",
           "families_choosing_attention_by_name"]

#: sizes small enough for a CPU test, large enough to exercise GQA (4 query heads, 2 kv heads)
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)

# per-family settings that make the interesting feature reachable at tiny sizes
FAMILY_OVERRIDES = {
    "mistral": dict(sliding_window=4),
    "mixtral": dict(sliding_window=None, num_local_experts=4, num_experts_per_tok=2),
    "gemma2": dict(sliding_window=4, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, head_dim=16,
                   query_pre_attn_scalar=16),
    "gemma3_text": dict(sliding_window=4, head_dim=16, query_pre_attn_scalar=16),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "qwen3": dict(head_dim=16),
    "phi3": dict(pad_token_id=0),
    "gpt2": dict(n_positions=256),
    "modernbert": dict(local_attention=4, global_attn_every_n_layers=2),
    "codegen": dict(rotary_dim=8),
    "gptj": dict(rotary_dim=8),
    "helium": dict(head_dim=16),
    "hunyuan_v1_dense": dict(head_dim=16),
    "hunyuan_v1_moe": dict(head_dim=16, num_experts=4, moe_topk=2),
    "ministral": dict(head_dim=16),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=4),
    "deepseek_v2": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
}
# multi-head latent attention (DeepSeek-style): as many kv heads as query heads
for _family in ("axk1", "axk2", "deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite", "glm_moe_dsa",
                "longcat_flash", "minicpm3", "sarvam_mla", "youtu"):
    FAMILY_OVERRIDES.setdefault(_family, {})["num_key_value_heads"] = 4

_DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                 "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "summary_first_dropout",
                 "classifier_dropout", "activation_dropout", "ffn_dropout", "embedding_dropout")
_SPECIAL_TOKEN_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id",
                       "mask_token_id", "unk_token_id")


def tiny_config(family: str, **overrides):
    """A tiny config of a transformers model family (``"llama"``, ``"mistral"``, ...)."""
    kwargs = dict(TINY)
    kwargs.update(FAMILY_OVERRIDES.get(family, {}))
    kwargs.update(overrides)
    try:
        config = AutoConfig.for_model(family, **kwargs)
    except ValueError as e:
        raise PackmaskError(f"unknown model family {family!r} ({e}); use a model_type from transformers, "
                            f"e.g. 'llama', 'mistral', 'qwen2'.") from None
    vocab = getattr(config, "vocab_size", None)
    for key in _SPECIAL_TOKEN_KEYS:  # ids of the full-size vocabulary do not fit the tiny one
        value = getattr(config, key, None)
        if isinstance(vocab, int) and isinstance(value, int) and value >= vocab:
            setattr(config, key, 0 if key == "pad_token_id" else vocab - 1)
    for key in _DROPOUT_KEYS:  # exact comparisons need deterministic forward passes
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)
    return config


def tiny_model(family: str, attn_implementation: str = "packmask", seed: int = 0, dtype=torch.float32, **overrides):
    """A tiny random-init causal LM of ``family`` (same weights for the same seed)."""
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()


def pack_rows(seq_lengths, seq_len=None):
    """Row-major helpers for a packed batch: ``(doc_slices, position_ids)``.

    ``doc_slices`` lists ``(row, start, length)`` for every real (non-empty) document; the row's
    trailing padding is one more document for ``position_ids`` (the padding rule of
    :mod:`packmask.segments`), but no slice.

    >>> slices, pos = pack_rows([[3, 2], [4]], 6)
    >>> slices
    [(0, 0, 3), (0, 3, 2), (1, 0, 4)]
    >>> pos.tolist()
    [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    """
    slices = segments.spans_from_lengths(seq_lengths, seq_len)
    return slices, segments.position_ids_from_starts(segments.starts_from_lengths(seq_lengths, seq_len))


def run_alone(model, input_ids, doc_slices, **kwargs):
    """Logits of every document run on its own, scattered back into the packed ``[B, N, V]`` grid
    (positions not covered by a document stay 0)."""
    out = None
    for b, s, length in doc_slices:
        logits = model(input_ids=input_ids[b:b + 1, s:s + length], use_cache=False, **kwargs).logits
        if out is None:
            out = logits.new_zeros(input_ids.shape + (logits.shape[-1],))
        out = out.index_put((torch.tensor([b]), torch.arange(s, s + length)), logits[0])
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def grad_rel_err(model_a, model_b) -> tuple[float, str]:
    """Largest per-parameter relative gradient error between two models with the same parameters."""
    worst, name = 0.0, ""
    params_b = dict(model_b.named_parameters())
    for n, p in model_a.named_parameters():
        q = params_b[n]
        if p.grad is None and q.grad is None:
            continue
        if (p.grad is None) != (q.grad is None):
            return float("inf"), n
        if q.grad.norm() == 0 and p.grad.norm() == 0:
            continue
        e = rel_err(p.grad, q.grad)
        if e > worst:
            worst, name = e, n
    return worst, name


@functools.cache
def families_choosing_attention_by_name() -> list[str]:
    """Causal-LM families that, in the *installed* transformers, pick their attention classes by name
    (a ``*_ATTENTION_CLASSES`` dict, :func:`packmask.guards.attention_classes_by_name`) instead of
    transformers' AttentionInterface, so packmask refuses them when built. Which families these are
    changes between releases (falcon moved to the interface in 5.25), so tests take their examples
    from here rather than naming one.

    >>> "llama" in families_choosing_attention_by_name()
    False
    """
    import importlib
    import importlib.util
    import re

    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from .guards import attention_classes_by_name

    table = re.compile(r"^\w+_ATTENTION_CLASSES\s*=\s*\{", re.MULTILINE)
    found = []
    for family in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        name = model_type_to_module_name(family)
        module_name = f"transformers.models.{name}.modeling_{name}"
        try:
            spec = importlib.util.find_spec(module_name)
        except ImportError:
            continue
        if spec is None or not spec.origin:
            continue
        with open(spec.origin, encoding="utf-8") as source:  # read first: importing every family is slow
            if not table.search(source.read()):
                continue
        if attention_classes_by_name(importlib.import_module(module_name)) is not None:
            found.append(family)
    return found
