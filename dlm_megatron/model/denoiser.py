"""The denoiser: a megatron-core GPTModel made bidirectional, built from a ModuleSpec.

The transformer (RMSNorm, SwiGLU, RoPE, optional GQA) is megatron-core's own; we only swap
the attention mask type in the layer spec (no mask for masked diffusion, causal for AR,
arbitrary boolean masks for block diffusion / document masking) and teach the embedding
stage to honour explicit RoPE positions (megatron-core 0.16's GPTModel always uses
0..S-1 for rope, but block diffusion needs positions 0..L-1 repeated for x_t and x_0).

This file holds no distributed or training code: parallel sizes come in through the
TransformerConfig and process groups are megatron-core's.

Shape legend: B batch, S sequence, V (local) vocabulary, D head dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config import Config, ffn_size, head_dim, padded_vocab_size
from . import sharding


def transformer_config(cfg: Config, *, params_dtype: torch.dtype = torch.float32) -> TransformerConfig:
    m, p = cfg.model, cfg.parallel
    on_gpu = torch.cuda.is_available()
    recompute = {"none": {}, "selective": {"recompute_granularity": "selective"},
                 "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}}[m.recompute]
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=head_dim(m),
        ffn_hidden_size=ffn_size(m),
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        sequence_parallel=p.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        # We initialise weights ourselves (layout-independent, see sharding.py).
        use_cpu_initialization=True,
        perform_initialization=False,
        # Fused kernels need CUDA extensions; plain PyTorch paths are numerically equal.
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        bias_activation_fusion=on_gpu and effective_transformer_impl(cfg, warn=False) == "transformer_engine",
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        qk_layernorm=m.qk_layernorm,
        **recompute,
        **moe_settings(cfg, on_gpu),
    )


def moe_settings(cfg: Config, on_gpu: bool) -> dict:
    """megatron-core's MoE fields of the TransformerConfig (none for a dense model).

    Token dispatcher: all-to-all on GPU; allgather on CPU, because megatron-core 0.16.1's
    all-to-all dispatcher creates a torch.cuda.Stream unconditionally (gloo runs the
    allgather dispatcher's all-gather / reduce-scatter over the TP x EP group). Experts: grouped
    GEMM with Transformer Engine on GPU, SequentialMLP otherwise (checkpoint names are the same,
    see sharding.py). The aux loss is megatron's per-micro-batch Switch loss ('aux_loss')."""
    m = cfg.model
    if m.num_moe_experts is None:
        return {}
    from ..config import moe_ffn_size, moe_layer_pattern

    return dict(
        num_moe_experts=m.num_moe_experts,
        moe_router_topk=m.moe_router_topk,
        moe_ffn_hidden_size=moe_ffn_size(m),
        # megatron-core: None (not 0) means no shared expert
        moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size or None,
        moe_layer_freq=moe_layer_pattern(m),
        moe_aux_loss_coeff=m.moe_aux_loss_coeff,
        moe_router_load_balancing_type="aux_loss" if m.moe_aux_loss_coeff > 0 else "none",
        moe_router_score_function=m.moe_router_score_function,
        moe_router_pre_softmax=m.moe_router_pre_softmax,
        moe_router_enable_expert_bias=m.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=m.moe_router_bias_update_rate,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall" if on_gpu else "allgather",
        moe_grouped_gemm=moe_grouped_gemm(cfg, on_gpu),
        moe_permute_fusion=False,
        expert_model_parallel_size=cfg.parallel.ep,
    )


def moe_grouped_gemm(cfg: Config, on_gpu: bool) -> bool:
    """Grouped GEMM experts (Transformer Engine's TEGroupedMLP) on GPU with TE; SequentialMLP otherwise."""
    return on_gpu and effective_transformer_impl(cfg, warn=False) == "transformer_engine"


def attn_mask_type_for(objective) -> AttnMaskType:
    """The attention mask an objective trains with (``objective``: a name or a Config; a
    Config with diffusion.anneal_steps > 0 needs arbitrary masks for AR->diffusion annealing)."""
    if isinstance(objective, Config):
        from .backends import uses_arbitrary_masks

        if uses_arbitrary_masks(objective):  # document_masks: per-batch masks from data.loader.with_document_mask
            return AttnMaskType.arbitrary
        objective = objective.diffusion.objective
    if objective == "ar":
        return AttnMaskType.causal
    if objective in ("block",):
        return AttnMaskType.arbitrary
    return AttnMaskType.no_mask


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def effective_transformer_impl(cfg: Config, *, warn: bool = True) -> str:
    """``model.transformer_impl`` as it can run here: the Transformer Engine spec needs TE
    (megatron-core 0.16 cannot even build it without: NameError TESpecProvider); without it
    the local spec with SDPA attention runs instead, said in one line."""
    if cfg.model.transformer_impl == "transformer_engine" and not transformer_engine_available():
        if warn and not getattr(effective_transformer_impl, "_warned", False):
            effective_transformer_impl._warned = True
            print("note: model.transformer_impl=transformer_engine but Transformer Engine is not installed; "
                  "using the local megatron-core spec with model.attention_backend="
                  f"{cfg.model.attention_backend} (sdpa for auto)", flush=True)
        return "local"
    return cfg.model.transformer_impl


def layer_spec(cfg: Config, mask_type: AttnMaskType, *, moe: bool = False) -> ModuleSpec:
    """One transformer layer's spec: megatron-core's (local or TE), with our mask type and
    attention kernel; ``moe``: its MLP is megatron-core's MoE layer."""
    from .attention import core_attention_builder
    from .backends import attention_kernel

    block = cfg.diffusion.objective == "block"
    m = cfg.model
    experts = dict(num_experts=m.num_moe_experts, moe_grouped_gemm=moe_grouped_gemm(cfg, torch.cuda.is_available())) if moe else {}
    impl = effective_transformer_impl(cfg)
    # TE's fused attention covers no mask and causal; an arbitrary mask (block diffusion's 2L,
    # annealing, document masks) would run on TE's unfused s x s path, so it gets our kernel.
    replace = attention_kernel(cfg, impl) != "te"
    if impl == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=m.qk_layernorm, **experts)
    else:
        from .norm import HeadNorm, HiddenNorm

        spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=m.qk_layernorm, **experts)
        # megatron's WrappedTorchNorm refuses sequence parallelism; ours builds the same torch
        # modules and marks the hidden-size norms for finalize's TP all-reduce (norm.py).
        sub = spec.submodules
        sub.input_layernorm = sub.pre_mlp_layernorm = HiddenNorm
        if m.qk_layernorm:
            sub.self_attention.submodules.q_layernorm = sub.self_attention.submodules.k_layernorm = HeadNorm
    spec.submodules.self_attention.params = dict(spec.submodules.self_attention.params, attn_mask_type=mask_type)
    if replace:
        spec.submodules.self_attention.submodules.core_attention = core_attention_builder(
            cfg.model.attention_backend, cfg.diffusion.block_size if block else None, block=block)
    return spec


def decoder_spec(cfg: Config, mask_type: AttnMaskType, pp_rank: int):
    """The decoder's spec: one layer spec (dense model), or this pipeline stage's per-layer specs
    with MoE and dense layers as model.moe_layer_freq / moe_first_k_dense say."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from ..config import moe_layer_pattern
    from .norm import HiddenNorm

    norm = HiddenNorm  # the final norm (megatron's default is WrappedTorchNorm, see norm.py)
    if effective_transformer_impl(cfg, warn=False) == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        norm = TENorm
    per_stage = cfg.model.num_layers // cfg.parallel.pp
    if cfg.model.num_moe_experts is None:
        return TransformerBlockSubmodules(layer_specs=[layer_spec(cfg, mask_type)] * per_stage, layer_norm=norm)
    dense, moe = layer_spec(cfg, mask_type), layer_spec(cfg, mask_type, moe=True)
    pattern = moe_layer_pattern(cfg.model)[pp_rank * per_stage: (pp_rank + 1) * per_stage]
    return TransformerBlockSubmodules(layer_specs=[moe if is_moe else dense for is_moe in pattern], layer_norm=norm)


class Denoiser(GPTModel):
    """GPTModel whose RoPE honours ``position_ids`` (needed for block diffusion's 2L input)."""

    def _preprocess(self, input_ids, position_ids, decoder_input=None, inference_context=None, packed_seq_params=None, padding_mask=None):
        out = super()._preprocess(input_ids, position_ids, decoder_input=decoder_input, inference_context=inference_context,
                                  packed_seq_params=packed_seq_params, padding_mask=padding_mask)
        if getattr(self, "_explicit_positions", False) and position_ids is not None and self.position_embedding_type == "rope":
            # Training positions never exceed the model's length: a table that long needs no
            # host sync (reading position_ids.max() would stall the GPU every micro-batch).
            # Sampling may run past it (prompt + generation), so there it looks.
            max_pos = self.max_sequence_length
            if not self.training:
                max_pos = max(max_pos, int(position_ids.max().item()) + 1)
            table_P11D = self.rotary_pos_emb(max_pos)
            rope_SB1D = table_P11D[:, 0, 0, :][position_ids.t()].unsqueeze(2)
            out = (out[0], rope_SB1D) + tuple(out[2:])
        return out

    # ---- continuous (CDCD) diffusion: noisy embeddings enter through decoder_input ----

    def enable_continuous(self, num_features: int) -> None:
        """Add the time embedding (first pipeline stage only): a learned projection
        [H, F] of fixed Fourier features of ln(sigma)/4, replicated across TP ranks
        (canonical name ``time_embedding.proj.weight``, see sharding.py)."""
        self.time_features = num_features
        if self.pre_process:
            self.time_embedding = torch.nn.Module()
            self.time_embedding.proj = torch.nn.Linear(num_features, self.config.hidden_size, bias=False,
                                                       dtype=self.config.params_dtype)

    def clean_embeddings(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        """Token embeddings normalised to norm sqrt(H).  -> [B, S, H]

        megatron's VocabParallelEmbedding looks up this rank's rows and all-reduces over TP,
        so every TP rank gets the full vectors (and the backward reaches each shard); a row
        normalised after lookup equals the lookup of the normalised row."""
        from ..diffusion.continuous import normalise

        return normalise(self.embedding.word_embeddings(input_ids_BS))

    def normalised_embedding_table(self) -> torch.Tensor:
        """All normalised embedding rows [V_padded, H] (TP=1, e.g. for the sampler)."""
        from ..diffusion.continuous import normalise

        return normalise(self.embedding.word_embeddings.weight)

    def continuous_input(self, input_ids_BS, sigma_B, noise_seed_B=None, noisy_x_BSH=None) -> torch.Tensor:
        """decoder_input [S, B, H] = c_in(sigma) * x + time_embedding(sigma), with
        x = normalised e(x0) + sigma * n (noise from per-sample seeds) or the sampler's x.

        ``sigma_B`` and ``noise_seed_B`` are host (CPU) tensors in training: the noise and the
        Fourier features are made on the host and copied to the device (no device sync)."""
        from ..diffusion import continuous as cd

        sig = sigma_B.float()
        if noisy_x_BSH is None:
            e = self.clean_embeddings(input_ids_BS)
            B, S, H = e.shape
            n = cd.noise_for(noise_seed_B.cpu(), S, H).to(e.device, e.dtype)
            x = e + sig.to(e.dtype)[:, None, None] * n
        else:
            x = noisy_x_BSH
        feats = cd.fourier_features(cd.c_noise(sig.cpu()), self.time_features).to(x.device, self.time_embedding.proj.weight.dtype)
        h = x * cd.c_in(sig).to(x.device, x.dtype)[:, None, None] + self.time_embedding.proj(feats)[:, None, :].to(x.dtype)
        return h.to(self.config.params_dtype).transpose(0, 1).contiguous()

    def forward(self, input_ids, position_ids, attention_mask, *args, explicit_positions: bool = False,
                sigma_B=None, noise_seed_B=None, noisy_x_BSH=None, loss_index=None, logit_positions=None, **kwargs):
        """megatron-core's GPTModel forward, plus: ``explicit_positions`` (RoPE at position_ids),
        continuous diffusion's inputs (``sigma_B`` ...), and ``loss_index``: the flat indices
        s * B + b of the positions that carry loss. With labels, the output layer and the
        cross-entropy then run on those rows only and the returned per-token NLL [B, S] is 0
        elsewhere (masked diffusion puts loss on the masked tokens only, block diffusion on the
        masked x_t tokens: about half of the rows, and never the x_0 half). ``logit_positions``
        ([n] long, sorted sequence positions; no labels): the output layer runs on those
        positions only and the logits come back as [B, n, V] (the samplers read a few)."""
        if sigma_B is not None and self.pre_process:
            kwargs["decoder_input"] = self.continuous_input(input_ids, sigma_B, noise_seed_B, noisy_x_BSH)
        self._explicit_positions = explicit_positions
        self._loss_index = loss_index
        self._logit_positions = logit_positions
        try:
            return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        finally:
            self._explicit_positions = False
            self._loss_index = None
            self._logit_positions = None

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        rows = getattr(self, "_logit_positions", None)
        if rows is not None:
            if labels is not None or self.config.sequence_parallel or self.config.mtp_num_layers:
                raise ValueError("logit_positions: logits only (no labels), without sequence parallel or MTP")
            if self.post_process:  # hidden [S, B, H] -> the rows the output layer runs on [n, B, H]
                hidden_states = hidden_states.index_select(0, rows)
        index = getattr(self, "_loss_index", None)
        if (index is None or labels is None or not self.post_process
                or self.config.mtp_num_layers or kwargs.get("inference_context") is not None):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        return self._loss_on_rows(hidden_states, labels, index)

    def _loss_on_rows(self, hidden_SBH: torch.Tensor, labels_BS: torch.Tensor, index_N: torch.Tensor) -> torch.Tensor:
        """Per-token NLL [B, S] from the output layer and vocab-parallel cross-entropy on the
        rows ``index_N`` (flat s * B + b) of hidden states [S, B, H] only; 0 elsewhere.

        Under sequence parallelism this rank holds S/tp positions: the sequence is all-gathered
        first (its backward keeps this rank's slice) and the output layer runs without its own
        sequence gather, so its input gradient is all-reduced over TP once (megatron's
        ColumnParallelLinear: copy_to_tensor_model_parallel_region), as GPTModel does for its
        inference-time last-token logits."""
        sp = self.output_layer.sequence_parallel
        if sp:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden_SBH = gather_from_sequence_parallel_region(hidden_SBH, tensor_parallel_output_grad=False)
        S, B, H = hidden_SBH.shape
        rows_N1H = hidden_SBH.reshape(S * B, 1, H).index_select(0, index_N)
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        self.output_layer.sequence_parallel = False
        try:
            logits_N1V, _ = self.output_layer(rows_N1H, weight=weight)
        finally:
            self.output_layer.sequence_parallel = sp
        target_1N = labels_BS.t().reshape(1, S * B).index_select(1, index_N)
        nll_1N = self.compute_language_model_loss(target_1N, logits_N1V)  # [1, N] (it reads labels as [b, s])
        out = torch.zeros(S * B, dtype=nll_1N.dtype, device=nll_1N.device)
        out = out.index_copy(0, index_N, nll_1N.reshape(-1))
        return out.reshape(S, B).t()


def mark_tensor_parallel(model: torch.nn.Module) -> None:
    """Tag TP-split parameters with megatron's ``tensor_model_parallel``/``partition_dim``.

    megatron-core only sets these inside its own weight init, which we skip
    (perform_initialization=False). Gradient-norm code (ours, DeepSpeed's, megatron's
    optimizer) relies on them to count split weights on every rank and replicated ones once.
    """
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    for name, p in model.named_parameters():
        dim = sharding.partition_dim(name)
        if dim is None:
            continue
        if hasattr(p, "tensor_model_parallel"):  # megatron-core tags biases itself
            assert p.tensor_model_parallel and p.partition_dim == dim, name
            continue
        set_tensor_model_parallel_attributes(p, True, dim, 1)


def build_model(cfg: Config, vocab_size: int, *, pre_process: bool, post_process: bool, params_dtype=torch.float32,
                pp_rank: int = 0) -> Denoiser:
    """Build this rank's part of the denoiser (its TP shard of its PP stage's layers, and its
    expert-parallel share of the experts)."""
    tcfg = transformer_config(cfg, params_dtype=params_dtype)
    model = Denoiser(
        config=tcfg,
        transformer_layer_spec=decoder_spec(cfg, attn_mask_type_for(cfg), pp_rank),
        vocab_size=padded_vocab_size(vocab_size, cfg.model, cfg.parallel.tp),
        max_sequence_length=cfg.data.seq_len * (2 if cfg.diffusion.objective == "block" else 1),
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=cfg.model.rotary_base,
    )
    if cfg.diffusion.objective == "continuous":
        model.enable_continuous(cfg.diffusion.time_embed_features)
    mark_tensor_parallel(model)
    return model


def layer_offset(cfg: Config, pp_rank: int) -> int:
    return pp_rank * (cfg.model.num_layers // cfg.parallel.pp)


def expert_offset(cfg: Config, ep_rank: int) -> int:
    """Global index of this expert-parallel rank's first expert."""
    return ep_rank * (cfg.model.num_moe_experts or 0) // cfg.parallel.ep


def canonical_params(model: torch.nn.Module, cfg: Config, pp_rank: int, *, for_save: bool = False, ep_rank: int = 0):
    """Yield (canonical_name, local_param) for this rank's parameters, and the aux-free router
    bias buffers (``mlp.router.expert_bias``: state that is not a parameter but must be saved,
    resharded and exported). ``for_save`` leaves out the last stage's copy of tied embeddings
    (the first stage saves the same tensor)."""
    off, eoff = layer_offset(cfg, pp_rank), expert_offset(cfg, ep_rank)
    tied = cfg.model.tie_embeddings
    for name, p in model.named_parameters():
        if for_save and tied and name == sharding.TIED_OUTPUT:
            continue
        yield sharding.canonical_name(name, off, tied, eoff), p
    for name, b in model.named_buffers():
        if name.endswith(".router.expert_bias"):
            yield sharding.canonical_name(name, off, tied, eoff), b


@torch.no_grad()
def init_weights(model: torch.nn.Module, cfg: Config, *, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> None:
    """Layout-independent init: every parameter is drawn at full size from (seed, canonical
    name) and this rank keeps its slice, so TP/PP layouts start from identical weights.
    Draws happen on the parameters' device (move the model to the GPU first: an 8B model's
    draws then take seconds instead of minutes of single-threaded CPU work)."""
    tp = cfg.parallel.tp
    for name, p in canonical_params(model, cfg, pp_rank, ep_rank=ep_rank):
        full = sharding.init_full(name, sharding.full_shape(p.shape, name, tp), seed=cfg.train.seed,
                                  std=cfg.model.init_method_std, num_layers=cfg.model.num_layers, device=p.device)
        p.copy_(sharding.shard(full, name, tp_rank, tp).to(p.dtype))
        del full
