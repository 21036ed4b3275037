"""Tiny configurations of the hybrid and recurrent families (fast CPU tests, ``packmask verify``).

Full-size defaults of these families make a "tiny" model slow (Qwen3.5's gated delta net alone has
8192 convolution channels) or put only one kind of layer in two layers. These settings shrink the
mixers and interleave mixer and attention layers, so both kinds run in every test; chunked kernels
get chunks shorter than a document so chunk boundaries are exercised too.

>>> HYBRID_OVERRIDES["qwen3_5_text"]["layer_types"]
['linear_attention', 'full_attention']
"""
from __future__ import annotations

__all__ = ["HYBRID_OVERRIDES", "HYBRID_FAMILIES"]

_GDN = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
            linear_conv_kernel_dim=4, head_dim=16)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
_MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2,
               mamba_chunk_size=8)
_HYBRID = ["linear_attention", "full_attention"]

#: per-family settings merged into :data:`packmask.testing.FAMILY_OVERRIDES`
HYBRID_OVERRIDES = {
    "qwen3_5_text": dict(_GDN, layer_types=_HYBRID),
    "qwen3_5_moe_text": dict(_GDN, **_MOE, layer_types=_HYBRID),
    "qwen3_next": dict(_GDN, **_MOE, layer_types=_HYBRID),
    "qwen4_exp_text": dict(_GDN, **_MOE, layer_types=_HYBRID, ple_embed_dim=32, indexer_budget=8,
                           indexer_compress_ratio=2, indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16),
    "olmo_hybrid": dict(_GDN, layer_types=_HYBRID),
    "lara_mini": dict(_GDN, **_MOE, layer_types=["linear_attention", "sliding_attention"], sliding_window=4),
    "kimi_linear": dict(layer_types=_HYBRID, mlp_layer_types=["dense", "dense"], linear_num_heads=4,
                        linear_head_dim=16, linear_conv_kernel_dim=4, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, head_dim=16, num_key_value_heads=4, num_experts=4,
                        num_experts_per_token=2, moe_intermediate_size=32),
    "bailing_hybrid": dict(layer_types=_HYBRID, mlp_layer_types=["dense", "dense"], linear_num_heads=4,
                           linear_head_dim=16, linear_conv_kernel_dim=4, kv_lora_rank=16, qk_rope_head_dim=8,
                           qk_nope_head_dim=8, v_head_dim=16, head_dim=16, num_key_value_heads=4, num_experts=4,
                           num_experts_per_token=2, moe_intermediate_size=32, expert_swiglu_limit_list=[0, 0],
                           share_expert_swiglu_limit_list=[0, 0]),
    "minimax": dict(layer_types=_HYBRID, block_size=4, num_local_experts=4, num_experts_per_tok=2, head_dim=16),
    "nemotron_h": dict(num_hidden_layers=3, layers_block_type=["linear_attention", "full_attention", "mlp"],
                       mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2, expand=2, conv_kernel=4,
                       chunk_size=8, head_dim=16, n_routed_experts=4, moe_intermediate_size=32,
                       moe_shared_expert_intermediate_size=32),
    "granitemoehybrid": dict(_MAMBA2, layer_types=_HYBRID, num_local_experts=4, num_experts_per_tok=2,
                             shared_intermediate_size=32),
    "falcon_h1": dict(_MAMBA2, mamba_d_ssm=128, head_dim=16),
    "bamba": dict(_MAMBA2, attn_layer_indices=[1]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_dt_rank=8, mamba_expand=2),
    "zamba": dict(num_hidden_layers=3, layers_block_type=["mamba", "hybrid", "hybrid"], attn_layer_period=2,
                  attn_layer_offset=1,
                  attention_head_dim=16, n_mamba_heads=2, mamba_d_state=8, mamba_dt_rank=8),
    "zamba2": dict(layers_block_type=["mamba", "hybrid"], hybrid_layer_ids=[1], attention_head_dim=16,
                   mamba_headdim=16, n_mamba_heads=8, mamba_d_state=16, chunk_size=8, kv_channels=16,
                   num_key_value_heads=4),
    "mamba": dict(state_size=8, time_step_rank=8, intermediate_size=128),
    "falcon_mamba": dict(state_size=8, time_step_rank=8, intermediate_size=128),
    "mamba2": dict(num_heads=8, head_dim=16, n_groups=2, state_size=16, chunk_size=8, time_step_rank=8),
    "lfm2": dict(layer_types=["conv", "full_attention"], conv_L_cache=3),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], conv_L_cache=3, num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=32, num_dense_layers=1),
    "lfm3": dict(layer_types=["conv", "full_attention"], head_dim=16),
    "zaya": dict(head_dim=16, num_experts=4, moe_intermediate_size=32),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"], lru_width=64, head_dim=16, num_key_value_heads=4,
                            attention_window_size=16),
    "rwkv": dict(attention_hidden_size=64, context_length=256),
    "xlstm": dict(embedding_dim=64, num_blocks=2, num_heads=4, chunk_size=4),
    "inkling_text": dict(layer_types=["hybrid_sliding", "hybrid"], mlp_layer_types=["dense", "dense"], head_dim=16,
                         swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16,
                         sliding_window_size=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "inkling2_text": dict(layer_types=["hybrid_sliding", "hybrid"], head_dim=16, swa_num_attention_heads=4,
                          swa_num_key_value_heads=2, swa_head_dim=16, sliding_window_size=4, n_routed_experts=4,
                          num_experts_per_tok=2, moe_intermediate_size=32, n_layers_per_attn_res_block=1),
    "inkling2_loop_text": dict(layer_types=["hybrid_sliding", "hybrid"], head_dim=16, swa_num_attention_heads=4,
                               swa_num_key_value_heads=2, swa_head_dim=16, sliding_window_size=4, n_routed_experts=4,
                               num_experts_per_tok=2, moe_intermediate_size=32, n_layers_per_attn_res_block=1),
}

#: the hybrid and recurrent families of issue 24 (those the installed transformers has are tested)
HYBRID_FAMILIES = tuple(HYBRID_OVERRIDES)
