"""Configuration of a diffusion language model exported by dlm_megatron.

Shipped next to the weights (``trust_remote_code=True``); needs only torch and transformers.
Key names follow LLaDA's published ``configuration_llada.py`` where the architecture is the
same (d_model, n_heads, n_kv_heads, n_layers, mlp_hidden_size, vocab_size, embedding_size,
rope_theta, rms_norm_eps, max_sequence_length, weight_tying, mask_token_id, ...). Keys of
our own: ``objective`` (masked | block | ar | uniform | hybrid), ``block_size`` (block
diffusion), ``shift_logits`` (token i read from output i-1, DiffuLLaMA/Dream style),
``qk_norm``, ``head_dim`` (one head's width; n_heads * head_dim may differ from d_model,
as in Qwen3; absent = d_model / n_heads) and the mixture-of-experts keys ``moe_*``.
"""
from transformers import PretrainedConfig


class DLMConfig(PretrainedConfig):
    model_type = "dlm_megatron"
    # Generic names used by transformers utilities -> LLaDA-style names stored in config.json.
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "num_hidden_layers": "n_layers",
        "intermediate_size": "mlp_hidden_size",
        "max_position_embeddings": "max_sequence_length",
    }

    def __init__(
        self,
        d_model: int = 256,
        n_heads: int = 4,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        n_layers: int = 4,
        mlp_hidden_size: int = 704,
        vocab_size: int = 8192,
        embedding_size: int | None = None,
        max_sequence_length: int = 4096,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        weight_tying: bool = False,
        include_bias: bool = False,
        include_qkv_bias: bool = False,
        init_std: float = 0.02,
        mask_token_id: int | None = None,
        objective: str = "masked",
        block_size: int | None = None,
        shift_logits: bool = False,
        block_type: str = "llama",
        layer_norm_type: str = "rms",
        activation_type: str = "silu",
        rope: bool = True,
        alibi: bool = False,
        qk_norm: bool = False,
        moe_num_experts: int = 0,
        moe_top_k: int = 0,
        moe_intermediate_size: int = 0,
        moe_shared_expert_intermediate_size: int = 0,
        moe_layers: list | None = None,
        moe_pre_softmax: bool = False,
        moe_score_function: str = "softmax",
        moe_expert_bias: bool = False,
        **kwargs,
    ):
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads if n_kv_heads is not None else n_heads
        self.head_dim = head_dim if head_dim is not None else d_model // n_heads
        self.n_layers = n_layers
        self.mlp_hidden_size = mlp_hidden_size
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size if embedding_size is not None else vocab_size
        self.max_sequence_length = max_sequence_length
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.weight_tying = weight_tying
        self.include_bias = include_bias
        self.include_qkv_bias = include_qkv_bias
        self.init_std = init_std
        self.mask_token_id = mask_token_id
        self.objective = objective
        self.block_size = block_size
        self.shift_logits = shift_logits
        self.block_type = block_type
        self.layer_norm_type = layer_norm_type
        self.activation_type = activation_type
        self.rope = rope
        self.alibi = alibi
        # Per-head RMSNorm of q and k before RoPE.
        self.qk_norm = qk_norm
        # Mixture of experts (megatron-core's router semantics): moe_layers[i] = 1 marks a MoE
        # layer; moe_pre_softmax: softmax over all experts, top-k not renormalised; otherwise
        # softmax over the top-k logits; sigmoid: top-k of sigmoid (+ expert_bias for the
        # choice only), renormalised over the top-k.
        self.moe_num_experts = moe_num_experts
        self.moe_top_k = moe_top_k
        self.moe_intermediate_size = moe_intermediate_size
        self.moe_shared_expert_intermediate_size = moe_shared_expert_intermediate_size
        self.moe_layers = list(moe_layers) if moe_layers is not None else [0] * n_layers
        self.moe_pre_softmax = moe_pre_softmax
        self.moe_score_function = moe_score_function
        self.moe_expert_bias = moe_expert_bias
        # The output head is tied by the modeling code itself (weight_tying), not by
        # transformers' generic tying.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)
