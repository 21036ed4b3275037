"""A tiny transformers model that picks its attention class by name, as falcon did up to
transformers 5.24 and gpt_neo, git, bark still do: it bypasses transformers' AttentionInterface in
every release, so refusal tests hold whichever families the installed transformers moved.

transformers decides whether a model may switch attention after construction from its module's
source (an ``*Attention*(nn.Module)`` class and no interface lookup), so this module is exactly
that: one attention class chosen from ``TOY_ATTENTION_CLASSES`` by ``config._attn_implementation``.
"""
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


class ToyByNameConfig(PretrainedConfig):
    model_type = "toy_by_name"

    def __init__(self, vocab_size=32, hidden_size=8, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        super().__init__(**kwargs)


class ToyEagerAttention(nn.Module):
    """Plain causal softmax attention with one head, in the model's own code."""

    def __init__(self, config):
        super().__init__()
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)

    def forward(self, hidden):
        q, k, v = self.qkv(hidden).chunk(3, dim=-1)
        n = hidden.shape[1]
        scores = (q @ k.transpose(-1, -2)).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        return scores.softmax(-1) @ v


TOY_ATTENTION_CLASSES = {"eager": ToyEagerAttention, "sdpa": ToyEagerAttention}


class ToyByNameModel(PreTrainedModel):
    config_class = ToyByNameConfig
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)  # registered first, like a real model
        self.attn = TOY_ATTENTION_CLASSES[config._attn_implementation](config)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.attn(self.embed(input_ids))


def build(attn_implementation: str) -> ToyByNameModel:
    return ToyByNameModel._from_config(ToyByNameConfig(), attn_implementation=attn_implementation)
