"""Tiny random models of any transformers family, built offline from configs (no downloads): what
:func:`packmask.verify`, ``packmask verify --model <family>`` and the tests run on.

>>> config = tiny_config("llama")
>>> config.hidden_size, config.num_hidden_layers, config.num_key_value_heads
(64, 2, 2)
"""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from .errors import PackmaskError

__all__ = ["TINY", "FAMILY_OVERRIDES", "tiny_config", "tiny_model"]

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
# recurrent: tiny mixers and interleaved mixer / attention layers for the hybrid families
from .tiny_hybrid import HYBRID_OVERRIDES  # noqa: E402

for _family, _settings in HYBRID_OVERRIDES.items():
    FAMILY_OVERRIDES[_family] = {**FAMILY_OVERRIDES.get(_family, {}), **_settings}
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


