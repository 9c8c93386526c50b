"""Layout planner: parameters, FLOPs, per-GPU memory and throughput of a config on N GPUs.

Pure functions of (Config, vocabulary size, layout numbers); no torch, no I/O. The CLI is
``tools/plan.py``; the formulas are documented in docs/planner.md and restated next to
the code that implements them.

Notation (all per GPU unless stated):
  h hidden, L layers, a heads, g query groups (KV heads), d head dim (model.kv_channels,
  default h/a), q = a*d query and attention-output width (= h unless kv_channels is set), kv = g*d,
  f SwiGLU inner size, V vocabulary, Vp padded vocabulary, s model sequence length
  (data.seq_len, doubled for objective=block), b micro batch, t TP, p PP, D data-parallel
  size = N/(t*p), Psi parameters held by one GPU (its TP shard of its PP stage).
  Mixture of experts: E experts of f_e units per MoE layer, k per token, ep expert-parallel
  ranks; a GPU holds E/ep experts of each MoE layer, whose optimizer states the distributed
  optimizer shards over the dp/ep ranks holding the same experts. FLOPs count the active
  parameters (k experts, router, shared expert), so MFU does too.

Memory model (bytes):
  weights    w * Psi                  (/D with ZeRO-3)       w = 2 bf16, 4 fp32
  gradients  w * Psi                  (/D with ZeRO-2, 3)
  optimizer  o * Psi                  (/D with ZeRO-1, 2, 3) o = 12 bf16 (fp32 master + m + v),
                                                              8 fp32 (m + v; weights are the master)
  activations: per layer and token, following Korthikanti et al. 2022 ("Reducing Activation
    Recomputation in Large Transformer Models", sec. 4) term by term, adapted to RMSNorm,
    SwiGLU, RoPE, GQA, no biases and no dropout; see ``layer_activation_terms``. The first
    pipeline stage holds min(p, microbatches) microbatches in flight (1F1B).
  peak = weights + gradients + optimizer + ZeRO buffers + max(activation peak, optimizer-step
    transient), where the activation peak is the saved activations plus the larger of
    (a) the logits/cross-entropy buffers at the end of the forward and start of the backward,
    (b) the backward working set of one layer (plus, with full recompute, that layer's
        recomputed activations).
  total = peak * (1 + fragmentation) + fixed overhead (CUDA context, NCCL, cuBLAS workspaces).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .config import Config, ConfigError, ffn_size, head_dim, padded_vocab_size

GIB = 2**30

# DeepSpeed's default ZeRO bucket (elements) when ds_config leaves reduce_bucket_size unset.
ZERO_REDUCE_BUCKET = 500_000_000
PRESET_TARGET = 0.90
"""The shipped 8B presets are sized so their plan uses at most this share of an 80 GB GPU."""


class PlanError(ValueError):
    """An impossible layout or bad planner input, phrased as one line."""


# ---------------------------------------------------------------------------------------
# Model shape


@dataclass(frozen=True)
class Dims:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    kv_dim: int
    ffn: int
    vocab: int
    padded_vocab: int
    data_seq_len: int
    seq_len: int
    """Model sequence length: data.seq_len, or 2 * data.seq_len for block diffusion (x_t ++ x_0)."""
    tied: bool
    explicit_positions: bool
    """Block diffusion passes RoPE positions per sample: the rotary tables become [s, b, 1, d]."""
    qkv_bias: bool = False
    """model.add_qkv_bias: q/k/v projection biases (h + 2*kv_dim per layer, split by TP)."""
    qk_norm: bool = False
    """model.qk_layernorm: per-head RMSNorm of q and k (2 * head_dim weights per layer)."""
    moe_layers: int = 0
    """Layers whose MLP is a mixture of experts (model.num_moe_experts); the rest are dense."""
    experts: int = 0
    """Routed experts per MoE layer (E)."""
    topk: int = 0
    """Experts per token (k)."""
    expert_ffn: int = 0
    """SwiGLU inner size of one routed expert (f_e)."""
    shared_ffn: int = 0
    """SwiGLU inner size of the shared expert, 0 without (f_s)."""

    @property
    def q_dim(self) -> int:
        """Query and attention-output width a*d (q): h unless model.kv_channels is set."""
        return self.heads * self.head_dim


def model_dims(cfg: Config, vocab_size: int, tp: int = 1) -> Dims:
    m = cfg.model
    h, a = m.hidden_size, m.num_attention_heads
    g = m.num_query_groups or a
    d = head_dim(m)
    block = cfg.diffusion.objective == "block"
    try:
        vp = padded_vocab_size(vocab_size, m, tp)
    except ConfigError as e:
        raise PlanError(str(e)) from None
    from .config import moe_ffn_size, moe_layer_pattern

    moe = m.num_moe_experts is not None
    return Dims(hidden=h, layers=m.num_layers, heads=a, kv_heads=g, head_dim=d, kv_dim=g * d, ffn=ffn_size(m),
                vocab=vocab_size, padded_vocab=vp, data_seq_len=cfg.data.seq_len,
                seq_len=cfg.data.seq_len * (2 if block else 1), tied=m.tie_embeddings, explicit_positions=block,
                qkv_bias=m.add_qkv_bias, qk_norm=m.qk_layernorm, moe_layers=sum(moe_layer_pattern(m)),
                experts=m.num_moe_experts or 0, topk=m.moe_router_topk if moe else 0,
                expert_ffn=moe_ffn_size(m) if moe else 0, shared_ffn=m.moe_shared_expert_intermediate_size if moe else 0)


# ---------------------------------------------------------------------------------------
# Parameters


def layer_matrix_params(dm: Dims) -> int:
    """Weights of one layer's linear layers: QKV h(q+2kv), output projection q*h, SwiGLU fc1
    h*2f (gate and up) and fc2 f*h. No biases."""
    return attention_matrix_params(dm) + 3 * dm.hidden * dm.ffn


def attention_matrix_params(dm: Dims) -> int:
    """QKV h(q+2kv) and output projection q*h (q = h unless model.kv_channels is set)."""
    return dm.hidden * (dm.q_dim + 2 * dm.kv_dim) + dm.q_dim * dm.hidden


def expert_params(dm: Dims) -> int:
    """Routed experts of one MoE layer: E SwiGLU MLPs of 3*h*f_e (split over expert-parallel ranks)."""
    return dm.experts * 3 * dm.hidden * dm.expert_ffn


def moe_dense_params(dm: Dims) -> int:
    """The replicated part of one MoE layer's MLP: router E*h and shared expert 3*h*f_s."""
    return dm.experts * dm.hidden + 3 * dm.hidden * dm.shared_ffn


def moe_active_mlp_params(dm: Dims) -> int:
    """MLP weights one token passes through in a MoE layer: k routed experts, the shared
    expert and the router (active parameters)."""
    return dm.topk * 3 * dm.hidden * dm.expert_ffn + moe_dense_params(dm)


def matmul_params_per_token(dm: Dims) -> int:
    """Matrix weights one token multiplies through all layers (dense MLPs whole, MoE MLPs their
    active part): the 6 * N of training FLOPs with N the active parameters."""
    dense_layers = dm.layers - dm.moe_layers
    return (dm.layers * attention_matrix_params(dm) + dense_layers * 3 * dm.hidden * dm.ffn
            + dm.moe_layers * moe_active_mlp_params(dm))


def layer_bias_params(dm: Dims) -> int:
    """q/k/v biases of one layer (model.add_qkv_bias), else 0."""
    return dm.q_dim + 2 * dm.kv_dim if dm.qkv_bias else 0


def layer_params(dm: Dims) -> int:
    """One dense layer: matrices, q/k/v biases if any, its two RMSNorm weights (2h) and the
    per-head q/k norms (2d) if any."""
    return layer_matrix_params(dm) + layer_bias_params(dm) + 2 * dm.hidden + (2 * dm.head_dim if dm.qk_norm else 0)


def param_counts(dm: Dims, tp: int = 1, pp: int = 1, ep: int = 1) -> dict:
    """Total parameters and what one GPU holds on the first and last pipeline stage.

    TP shards every matrix (column/row parallel linears, vocab-parallel embedding and output
    layer) over t ranks; RMSNorm weights are replicated. PP gives each stage L/p layers; the
    embedding lives on the first stage, the final norm and output layer on the last (a tied
    output layer with p > 1 is a copy of the embedding kept on the last stage).
    """
    h, L = dm.hidden, dm.layers
    emb = dm.padded_vocab * h
    out = 0 if dm.tied else dm.padded_vocab * h
    # MoE layers: the dense MLP (3hf) replaced by router + shared expert + routed experts
    moe_delta = moe_dense_params(dm) + expert_params(dm) - 3 * h * dm.ffn
    total = L * layer_params(dm) + dm.moe_layers * moe_delta + emb + out + h
    experts = dm.moe_layers * expert_params(dm)
    active = total - experts + dm.moe_layers * dm.topk * 3 * h * dm.expert_ffn
    lps = L // pp
    norms = 2 * h + (2 * dm.head_dim if dm.qk_norm else 0)
    moe_on_stage = dm.moe_layers * lps / L  # MoE layers spread evenly over the stages
    stage_experts = int(moe_on_stage * expert_params(dm)) // (tp * ep)
    stage_layers = (lps * ((layer_matrix_params(dm) + layer_bias_params(dm)) // tp + norms)
                    + int(moe_on_stage * (moe_dense_params(dm) - 3 * h * dm.ffn // tp)) + stage_experts)
    emb_local = emb // tp
    first = stage_layers + emb_local
    last = stage_layers + h + emb_local  # final norm + output layer (or its tied copy)
    if pp == 1:
        first = last = stage_layers + emb_local + h + (0 if dm.tied else emb_local)
    return {
        "total": total,
        "active": active,
        "experts": experts,
        "per_gpu_experts": stage_experts,
        "embedding": emb,
        "output_layer": out,
        "per_layer": layer_params(dm),
        "per_gpu_first_stage": first,
        "per_gpu_last_stage": last,
        "per_gpu": max(first, last),
    }


# ---------------------------------------------------------------------------------------
# FLOPs


def attention_fraction(cfg: Config, on_gpu: bool = True) -> float:
    """Share of the dense s x s attention work the run's kernel executes: the fraction of
    non-empty 128 x 128 tiles of the 2L mask for block diffusion under FlexAttention (it
    skips empty tiles); 1 for every dense kernel (sdpa, TE, megatron's own compute all pairs,
    masked ones included). MFU counts attention as executed."""
    from .diffusion.block import attended_tile_fraction
    from .model.backends import resolve_backend

    if cfg.diffusion.objective != "block":
        return 1.0
    if resolve_backend(cfg.model.attention_backend, block=True, cuda=on_gpu) != "flex":
        return 1.0
    return attended_tile_fraction(cfg.data.seq_len, cfg.diffusion.block_size)


def output_fraction(cfg: Config) -> float:
    """Expected share of the model's positions that carry loss, on which alone the trainer runs
    the output layer and cross-entropy (``Denoiser(loss_index=...)``): masked diffusion masks a
    token with probability t ~ U(eps, 1), so (1 + eps) / 2; block diffusion's loss sits on the
    masked tokens of the x_t half of its 2L rows, so E[t] / 2; AR, uniform/hybrid noise (their
    loss needs every logit) and continuous diffusion use every position. SFT counts as masked
    (its prompts carry no loss either, so its true share is lower)."""
    from .diffusion.block import noise_range

    d = cfg.diffusion
    if d.objective == "masked":
        return (1.0 + d.eps) / 2
    if d.objective == "block":
        lo, hi = noise_range(d.eps, d.t_min, d.t_max)
        return (lo + hi) / 4
    return 1.0


def flops_per_token(dm: Dims, recompute: str = "none", attention_fraction: float = 1.0,
                    output_fraction: float = 1.0) -> dict:
    """Training FLOPs per data token.

    Per model token: 6 * (matrix params a token passes through + V * h) for the matmuls (MoE
    layers: the k routed experts, router and shared expert, ``matmul_params_per_token``; forward 2,
    backward 4 FLOPs per weight) plus 12 * L * h * s for attention scores and values
    (forward QK^T and AV are 2*s*q each per token and layer, q = heads * head dim; x3 for training). This equals
    ``dlm_megatron.train.flops_per_token`` (unpadded vocabulary, no recompute), so the MFU
    logged by the trainer and the planner's MFU mean the same thing. Block diffusion runs the
    model on 2L tokens per L data tokens, with s = 2L: twice the FLOPs per model token count
    per data token. ``attention_fraction`` scales the attention term to the share of pairs
    the kernel executes, ``output_fraction`` the output layer to the share of positions it
    runs on (see the functions of those names): FLOPs are counted as executed.

    ``hardware`` adds recomputation: selective recomputes the core attention forward
    (4 * L * q * s), full recomputes the whole layer forward (2 * L * matrix params + 4 * L * q * s).
    """
    L, h, s = dm.layers, dm.hidden, dm.seq_len
    matmul = matmul_params_per_token(dm) + dm.vocab * h * output_fraction
    attn = 12.0 * L * dm.q_dim * s * attention_fraction
    per_model_token = 6.0 * matmul + attn
    extra = {"none": 0.0, "selective": attn / 3,
             "full": 2.0 * matmul_params_per_token(dm) + attn / 3}[recompute]
    ratio = dm.seq_len / dm.data_seq_len
    return {"model": per_model_token * ratio, "hardware": (per_model_token + extra) * ratio,
            "per_model_token": per_model_token}


# ---------------------------------------------------------------------------------------
# Activations


@dataclass(frozen=True)
class Kernels:
    impl: str
    """'local' (megatron-core local spec: unfused torch RMSNorm and SwiGLU) or 'fused'
    (Transformer Engine: RMSNorm fused into the next linear, fused SwiGLU)."""
    attention: str
    """'dense' (megatron DotProductAttention: stores the a*s*s softmax) or 'flash' (TE's fused
    attention, torch SDPA, or flex attention for block diffusion: stores q, k, v, output,
    log-sum-exp)."""


def kernels_for(cfg: Config, on_gpu: bool = True) -> Kernels:
    """The kernels a run of ``cfg`` uses: with the TE spec, TE's fused attention unless the run
    needs arbitrary masks (block, annealing, document masks: the layer spec swaps in the
    project's kernel there, as ``model.backends.attention_kernel`` says); otherwise what
    ``model.attention_backend`` resolves to (sdpa and flex store no s x s scores; dense,
    megatron's unfused attention, does)."""
    from .model.backends import attention_kernel

    impl = "fused" if cfg.model.transformer_impl == "transformer_engine" else "local"
    kernel = attention_kernel(cfg, cfg.model.transformer_impl, cuda=on_gpu)
    return Kernels(impl=impl, attention="dense" if kernel == "dense" else "flash")


def layer_activation_terms(dm: Dims, k: Kernels, recompute: str, *, tp: int, sp: bool, micro_batch: int,
                           act_bytes: int, moe: bool = False) -> dict:
    """Bytes one layer keeps for its backward, per token of one micro batch, term by term.

    Korthikanti et al. count, per layer, the LayerNorm inputs 4sbh, attention 11sbh + 5as^2b
    and MLP 19sbh (2-byte activations; 34sbh + 5as^2b in total), of which the LayerNorm
    inputs, the QKV and fc1 inputs and the dropout masks are replicated across TP ranks and
    everything else is divided by t (all of it divided by t with sequence parallelism). Here,
    per token, with e = activation bytes:

    norms (replicated unless SP), each of the two RMSNorms:
      fused:  input h + normalised output h (TE saves both for the fused norm+linear)
      local:  input h + x*rstd h + output h (torch's composite RMSNorm saves the scaled
              tensor for the weight gradient, the following linear saves the output)
      plus rstd, one fp32 per token.
    attention (divided by t; q = a*d, which is h unless model.kv_channels is set):
      flash:  q + k kv + v (a view of the fused QKV output, which keeps all q+2kv alive)
              + output q (saved once: flash backward and linear_proj share it)
              + log-sum-exp (a fp32)
      dense:  q + k + v + context q + softmax a*s (fp32 softmax result, plus the bf16 copy
              fed to the AV matmul in bf16); with MHA k is the rotated k (q) and v pins the
              QKV output (q+2kv); with GQA, k and v are expanded to q by repeat_interleave.
      selective recompute (core attention) keeps only its inputs q, k kv, v (QKV output
              q+2kv) and output q: the a*s softmax term and the GQA expansions vanish.
    MLP (divided by t):
      fused:  fc1 output 2f (input of the fused SwiGLU) + fc2 input f
      local:  fc1 output 2f + up-projection half f (copy) + silu output f + fc2 input f
    RoPE: cos and sin tables for q and k, 4*s*d per micro batch (4*s*b*d with explicit
      positions), in the activation dtype, not divided by t.
    No dropout masks (dropout is 0). Full recompute keeps only the layer input h (divided
    by t with SP); its recomputed activations are part of the backward working set.
    q/k norms (model.qk_layernorm, local RMSNorm per head): x*rstd of q and k (q + kv) and
      rstd, one fp32 per head and token (their inputs are the pinned QKV output, their
      outputs are rotated by RoPE into the q, k counted above); with GQA the query is not a
      view of the group-major QKV output but a reshaped copy (q), which q's norm keeps.
    MoE layer (``moe``; megatron-core's router, allgather/all-to-all dispatcher, SequentialMLP
      or grouped GEMM), replacing the MLP term, per token with k experts per token:
      router: fp32 [E] tensors kept for backward: the scores (softmax or sigmoid), the top-k
              probabilities scattered back to [E], the aux loss's own scores, plus the
              boolean routing maps (2E bytes);
      experts: the k routed copies of the token (h each: the experts' fc1 inputs) and, per
              copy, the local SwiGLU's 5 f_e of a dense MLP plus the activation scaled by the
              routing probability (f_e): e * k * (h + 6 f_e); a shared expert adds a dense
              MLP of f_s;
      permutation indices: int64 (8 bytes) for the dispatch and the combine of each copy.
    """
    h, f, kv, a, s, d = dm.hidden, dm.ffn, dm.kv_dim, dm.heads, dm.seq_len, dm.head_dim
    q = dm.q_dim
    e = act_bytes
    rep = tp if sp else 1
    if recompute == "full":
        return {"layer_input": e * h / rep}
    t = {}
    per_norm = (2 if k.impl == "fused" else 3) * h
    t["norms"] = e * 2 * per_norm / rep + 2 * 4
    mha = dm.kv_heads == dm.heads
    qkv_out = q + 2 * kv
    if recompute == "selective":
        attn = q + kv + qkv_out + q
    elif k.attention == "flash":
        attn = q + kv + qkv_out + q
    else:
        attn = q + (q + qkv_out if mha else 2 * q) + q
    t["attention"] = e * attn / tp
    if recompute != "selective":
        if k.attention == "flash":
            t["attention_lse"] = 4 * a / tp
        else:
            probs_bytes = 4 + (e if e < 4 else 0)  # softmax in fp32, plus its bf16 copy
            t["attention_probs"] = probs_bytes * a * s / tp
    if dm.qk_norm:
        t["qk_norm"] = e * (q + kv + (0 if mha else q)) / tp + 4 * (a + dm.kv_heads) / tp
    per_f = 3 if k.impl == "fused" else 5
    if moe:
        E, kk = dm.experts, dm.topk
        t["router"] = 3 * 4 * E + 2 * E
        t["experts"] = e * kk * (h + (per_f + 1) * dm.expert_ffn) / tp
        if dm.shared_ffn:
            t["shared_expert"] = e * per_f * dm.shared_ffn / tp
        t["permutation"] = 8 * 2 * kk
    else:
        t["mlp"] = e * per_f * f / tp
    t["rope"] = e * 4 * d * (1 if dm.explicit_positions else 1 / micro_batch)
    return t


def _backward_working_terms(dm: Dims, k: Kernels, recompute: str, *, tp: int, sp: bool, micro_batch: int,
                            act_bytes: int, moe: bool = False) -> float:
    """Bytes per token of gradients alive while the top layer of a stage runs its backward
    (on top of the saved activations): the incoming gradient h plus the larger of
      MLP:       the two input gradients of the SwiGLU product (2f; fc2's saved input is
                 freed by then),
      attention: dense: gradient of the softmax output and of its input (2*a*s, fp32; with
                 selective recompute also the recomputed softmax); flash: dq, dk, dv
                 (q+2kv); minus the MLP and pre-MLP norm activations already freed.
    """
    e = act_bytes
    rep = tp if sp else 1
    none = layer_activation_terms(dm, k, "none", tp=tp, sp=sp, micro_batch=micro_batch, act_bytes=e, moe=moe)
    incoming = e * dm.hidden / rep
    # MoE: per routed copy the SwiGLU input gradients (2 f_e) and the copy's gradient (h)
    w_mlp = incoming + (e * dm.topk * (2 * dm.expert_ffn + dm.hidden) / tp if moe else e * 2 * dm.ffn / tp)
    mlp_saved = sum(none[n] for n in ("mlp", "router", "experts", "shared_expert", "permutation") if n in none)
    if k.attention == "dense":
        w_attn = 4 * 2 * dm.heads * dm.seq_len / tp
        if recompute == "selective":
            w_attn += none["attention_probs"]
    else:
        w_attn = e * (dm.q_dim + 2 * dm.kv_dim) / tp
    w_attn += incoming - mlp_saved - none["norms"] / 2
    return max(w_mlp, w_attn)


def activation_memory(dm: Dims, k: Kernels, *, recompute: str, tp: int, pp: int, sp: bool, micro_batch: int,
                      num_microbatches: int, act_bytes: int, grad_bytes: int, stage: str) -> dict:
    """Activation bytes on one GPU of the ``stage`` ('first' or 'last') pipeline stage.

    In-flight micro batches (1F1B): the first stage runs min(p, m) forwards before its first
    backward, the last stage one; with p = 1 micro batches run one after another.
    """
    b, s = micro_batch, dm.seq_len
    tokens = b * s
    rep = tp if sp else 1
    e = act_bytes
    lps = dm.layers // pp
    first = stage == "first" or pp == 1
    last = stage == "last" or pp == 1
    in_flight = min(pp, num_microbatches) if (first and pp > 1) else 1
    terms = layer_activation_terms(dm, k, recompute, tp=tp, sp=sp, micro_batch=b, act_bytes=e)
    moe_on_stage = dm.moe_layers * lps / dm.layers  # MoE layers spread evenly over the stages
    moe_terms = layer_activation_terms(dm, k, recompute, tp=tp, sp=sp, micro_batch=b, act_bytes=e, moe=True) if moe_on_stage else terms
    per_layer_tok = ((lps - moe_on_stage) * sum(terms.values()) + moe_on_stage * sum(moe_terms.values())) / lps
    saved = in_flight * lps * per_layer_tok * tokens
    if moe_on_stage:
        terms = moe_terms  # reported: a MoE layer's terms
    out = {"in_flight_microbatches": in_flight, "layers_on_stage": lps,
           "per_layer_per_token": per_layer_tok, "layer_terms_per_token": terms,
           "saved_layers": saved}
    extra_saved = 0.0
    if first:
        extra_saved += in_flight * 8 * tokens  # int64 input ids kept by the embedding backward
    if pp > 1:
        # p2p receive/send buffers of one micro batch's hidden states
        extra_saved += 2 * e * dm.hidden / rep * tokens
    # Attention scratch / masks shared by all layers of a micro batch.
    persistent = 0.0
    if k.attention == "dense":
        # megatron's global memory buffer for the baddbmm of QK^T: [b*a/t, s, s] (a dense
        # kernel is always megatron's DotProductAttention, under the TE spec too)
        persistent += e * b * dm.heads / tp * s * s
        if dm.explicit_positions:
            persistent += s * s  # boolean [1, 1, s, s] block-diffusion mask
    out["saved_other"] = extra_saved
    out["persistent_buffers"] = persistent
    # (a) end of forward / start of backward on the last stage: logits and cross entropy.
    logits = 0.0
    if last:
        vloc = dm.padded_vocab / tp
        final_norm = e * (2 if k.impl == "fused" else 3) * dm.hidden / rep + 4
        ce_saved = 4 * vloc  # fp32 logits, turned in place into softmax, then into its gradient
        ce_lowp = e * vloc if e < 4 else 0  # bf16 logits (forward) / bf16 gradient (backward)
        ce_ints = 8 + 1  # int64 target index + bool target mask
        out_bwd = e * dm.hidden  # gradient of the output layer input (gathered)
        logits = (final_norm + ce_saved + ce_lowp + ce_ints + out_bwd) * tokens
        logits += grad_bytes * dm.padded_vocab * dm.hidden / tp  # output layer weight gradient before accumulation
    out["logits_ce"] = logits
    # (b) backward of one layer (largest transient), plus its recomputation with full recompute.
    moe = moe_on_stage > 0  # the largest layer's backward: a MoE layer's where there is one
    work = _backward_working_terms(dm, k, recompute, tp=tp, sp=sp, micro_batch=b, act_bytes=e, moe=moe) * tokens
    if recompute == "full":
        work += sum(layer_activation_terms(dm, k, "none", tp=tp, sp=sp, micro_batch=b, act_bytes=e, moe=moe).values()) * tokens
    out["backward_working"] = work
    out["peak"] = saved + extra_saved + persistent + max(logits, work)
    out["peak_phase"] = "end of forward (logits/CE)" if logits >= work else "layer backward"
    return out


# ---------------------------------------------------------------------------------------
# Model states


def state_bytes_per_param(engine: str, *, bf16: bool, zero_stage: int) -> dict:
    """Bytes per parameter each engine keeps, as it is configured in dlm_megatron/engine/, and
    which ZeRO stage first divides each term by DP: {term: (bytes, partitioned_from_stage)}.

    DeepSpeed (engine/deepspeed_engine.py):
      fp32: fp32 weights (4) and gradients (4); AdamW m, v (8); ZeRO >= 1 also keeps an fp32
        copy of the partition it updates (4).
      bf16, ZeRO-0: torch autocast: fp32 weights, gradients and m, v; plus the bf16 weight
        copies autocast makes for the forward and keeps for the backward (2).
      bf16, ZeRO-1: BF16_Optimizer: bf16 weights (2), one full-size fp32 gradient accumulator
        (4; each bf16 gradient is added and freed at once), fp32 master + m + v (12) per partition.
      bf16, ZeRO-2/3: bf16 weights (2), fp32 gradient accumulation (4) per partition, fp32
        master + m + v (12) per partition.
    megatron-core (engine/megatron_engine.py): weights in the run's precision; an fp32 gradient
      buffer (grad_reduce_in_fp32, 4); bf16 adds fp32 master weights (4); m, v (8); the
      distributed optimizer (zero_stage 1) partitions master + m + v over DP.
    """
    never = 99
    if engine == "megatron":
        w = 2 if bf16 else 4
        opt = (4 if bf16 else 0) + 8
        return {"weights": (w, never), "gradients": (4, never), "optimizer": (opt, 1)}
    if not bf16:
        return {"weights": (4, 3), "gradients": (4, 2), "optimizer": (8 + (4 if zero_stage >= 1 else 0), 1)}
    if zero_stage == 0:
        return {"weights": (4 + 2, never), "gradients": (4, never), "optimizer": (8, never)}
    if zero_stage == 1:
        return {"weights": (2, 3), "gradients": (4, never), "optimizer": (12, 1)}
    return {"weights": (2, 3), "gradients": (4, 2), "optimizer": (12, 1)}


def state_memory(psi: int, *, bf16: bool, zero_stage: int, dp: int, largest_module: int,
                 engine: str = "deepspeed") -> dict:
    """Weights, gradients and optimizer states of one GPU (``state_bytes_per_param``), each
    divided by DP from the ZeRO stage that partitions it (Rajbhandari et al. 2020), plus ZeRO
    buffers: DeepSpeed stages 1-3 allocate a gradient reduction bucket of reduce_bucket_size
    elements (default 5e8, whatever the model size) in the communication dtype (fp32 in every
    run here); stage 3 adds the gathered full weights of about two modules (the running one and
    the prefetched one). megatron-core reduces from views of its gradient buffer: no extra.
    Nothing extra appears at the optimizer step: every engine already holds fp32 gradients."""
    res = {}
    for term, (nbytes, from_stage) in state_bytes_per_param(engine, bf16=bf16, zero_stage=zero_stage).items():
        res[term] = nbytes * psi / (dp if zero_stage >= from_stage else 1)
    buffers = 0.0
    if engine == "deepspeed" and zero_stage >= 1:
        buffers += 4 * ZERO_REDUCE_BUCKET
    if engine == "deepspeed" and zero_stage >= 3:
        buffers += 2 * (2 if bf16 else 4) * largest_module
    res["zero_buffers"] = buffers
    return res


def expert_aware_state_memory(psi: int, psi_experts: int, lay, *, bf16: bool, largest_module: int) -> dict:
    """``state_memory`` of one GPU with routed experts (``psi_experts`` of its ``psi``
    parameters) sharded by the distributed optimizer over their own data-parallel group, dp/ep
    ranks (megatron-core's expert-data-parallel group): with ep = 1 that is the whole dp group.
    ``expert_states``: the experts' weights + gradients + optimizer states."""
    dense = state_memory(psi - psi_experts, bf16=bf16, zero_stage=lay.zero_stage, dp=lay.dp,
                         largest_module=largest_module, engine=lay.engine)
    exp = state_memory(psi_experts, bf16=bf16, zero_stage=lay.zero_stage, dp=lay.dp // lay.ep,
                       largest_module=largest_module, engine=lay.engine)
    out = {k: dense[k] + (exp[k] if k != "zero_buffers" else 0.0) for k in dense}
    out["expert_states"] = exp["weights"] + exp["gradients"] + exp["optimizer"]
    return out


def all_to_all_volume(dm: Dims, lay, act_bytes: int) -> dict:
    """Bytes one GPU sends to other expert-parallel ranks per optimizer step (MoE, ep > 1).

    Each of its tokens goes to k experts; with balanced routing (ep - 1) / ep of the copies
    live on another rank. Per MoE layer and micro-batch token the forward dispatches and
    combines k * h activations, the backward sends their gradients the same way: 4 * k * h *
    (ep - 1) / ep elements. Counted for the all-to-all dispatcher (GPU); the allgather
    dispatcher used on CPU moves more (every token to every rank)."""
    if not dm.moe_layers or lay.ep == 1:
        return {"bytes_per_step": 0.0, "bytes_per_token": 0.0}
    per_token = 4 * dm.topk * dm.hidden * act_bytes * (lay.ep - 1) / lay.ep * dm.moe_layers
    tokens = lay.global_batch_size * lay.model_seq_len / lay.dp
    return {"bytes_per_step": per_token * tokens, "bytes_per_token": per_token}


# ---------------------------------------------------------------------------------------
# The plan


@dataclass
class Layout:
    gpus: int
    tp: int
    pp: int
    dp: int
    zero_stage: int
    sequence_parallel: bool
    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int
    precision: str
    recompute: str
    objective: str
    data_seq_len: int
    model_seq_len: int
    kernels: str
    attention: str
    optimizer_engine: str
    engine: str
    ep: int = 1
    """Expert-parallel size: each MoE layer's experts split over ep of the dp ranks."""


def resolve_layout(cfg: Config, gpus: int, on_gpu: bool = True) -> Layout:
    """Check that ``cfg``'s layout can run on ``gpus`` devices; raise PlanError otherwise."""
    p, t, m = cfg.parallel, cfg.train, cfg.model
    if gpus < 1:
        raise PlanError(f"--gpus must be >= 1, got {gpus}")
    if gpus % (p.tp * p.pp):
        raise PlanError(f"--gpus {gpus} is not divisible by parallel.tp*parallel.pp={p.tp}*{p.pp}")
    dp = gpus // (p.tp * p.pp)
    if dp % p.ep:
        raise PlanError(f"parallel.ep={p.ep} does not divide the data-parallel size {dp} (--gpus {gpus} / (tp*pp))")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise PlanError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                        f"train.micro_batch_size*dp={t.micro_batch_size}*{dp}")
    if p.pp > 1 and p.zero_stage >= 2:
        raise PlanError(f"parallel.zero_stage={p.zero_stage} does not compose with parallel.pp={p.pp} "
                        "(pipeline layouts use megatron-core's distributed optimizer: zero_stage 0 or 1)")
    k = kernels_for(cfg, on_gpu)
    bf16 = t.precision == "bf16" or (t.precision == "auto" and on_gpu)
    from .config import resolved_engine

    eng = resolved_engine(p, cfg.model)
    if p.sequence_parallel and eng != "megatron":
        raise PlanError("parallel.sequence_parallel=true needs parallel.engine=megatron (DeepSpeed does not all-reduce "
                        "the norm gradients over tensor-parallel ranks)")
    if eng == "megatron":
        engine = "megatron-core distributed optimizer" if p.zero_stage == 1 else "megatron-core DDP"
    else:
        engine = f"DeepSpeed ZeRO-{p.zero_stage}" if p.zero_stage else "DeepSpeed (no ZeRO)"
    return Layout(gpus=gpus, tp=p.tp, pp=p.pp, dp=dp, zero_stage=p.zero_stage,
                  sequence_parallel=bool(p.sequence_parallel and p.tp > 1),
                  micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
                  num_microbatches=t.global_batch_size // (t.micro_batch_size * dp),
                  precision="bf16" if bf16 else "fp32", recompute=m.recompute, objective=cfg.diffusion.objective,
                  data_seq_len=cfg.data.seq_len,
                  model_seq_len=cfg.data.seq_len * (2 if cfg.diffusion.objective == "block" else 1),
                  kernels=k.impl, attention=k.attention, optimizer_engine=engine, engine=eng, ep=p.ep)


def plan(cfg: Config, *, gpus: int, gpu_mem_gib: float, vocab_size: int, mfu: float = 0.4,
         peak_tflops: float = 989.0, overhead_gib: float = 2.0, fragmentation: float = 0.10,
         on_gpu: bool = True) -> dict:
    """Everything ``tools/plan.py`` prints, as a JSON-able dict (bytes, FLOPs, tokens).

    ``on_gpu`` resolves the 'auto' settings as a GPU run would (precision bf16, flex attention
    for block diffusion); False resolves them as a CPU run (fp32, dense).
    """
    if not gpu_mem_gib > 0:
        raise PlanError(f"--gpu-mem-gib must be > 0, got {gpu_mem_gib}")
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu must be in (0, 1], got {mfu}")
    if not peak_tflops > 0:
        raise PlanError(f"--peak-tflops must be > 0, got {peak_tflops}")
    if overhead_gib < 0 or fragmentation < 0:
        raise PlanError("--overhead-gib and --fragmentation must be >= 0")
    if vocab_size < 1:
        raise PlanError(f"vocabulary size must be >= 1, got {vocab_size}")
    lay = resolve_layout(cfg, gpus, on_gpu)
    dm = model_dims(cfg, vocab_size, lay.tp)
    k = Kernels(impl=lay.kernels, attention=lay.attention)
    bf16 = lay.precision == "bf16"
    e = 2 if bf16 else 4
    params = param_counts(dm, lay.tp, lay.pp, lay.ep)
    flops = flops_per_token(dm, lay.recompute, attention_fraction(cfg, on_gpu), output_fraction(cfg))

    largest_module = max(layer_matrix_params(dm) // lay.tp, dm.padded_vocab * dm.hidden // lay.tp)
    stages = {}
    for stage in (("first", "last") if lay.pp > 1 else ("first",)):
        psi = params[f"per_gpu_{stage}_stage"]
        st = expert_aware_state_memory(psi, params["per_gpu_experts"], lay, bf16=bf16, largest_module=largest_module)
        act = activation_memory(dm, k, recompute=lay.recompute, tp=lay.tp, pp=lay.pp, sp=lay.sequence_parallel,
                                micro_batch=lay.micro_batch_size, num_microbatches=lay.num_microbatches,
                                act_bytes=e, grad_bytes=e, stage=stage)
        states = st["weights"] + st["gradients"] + st["optimizer"] + st["zero_buffers"]
        peak = states + act["peak"]
        overhead = fragmentation * peak + overhead_gib * GIB
        stages[stage] = {
            "params": psi,
            "expert_states": st["expert_states"],
            "weights": st["weights"], "gradients": st["gradients"], "optimizer": st["optimizer"],
            "zero_buffers": st["zero_buffers"],
            "activations": {k_: v for k_, v in act.items()},
            "activation_peak": act["peak"],
            "modeled_peak": peak,
            "overhead": overhead,
            "total": peak + overhead,
        }
    worst_name = max(stages, key=lambda n: stages[n]["total"])
    worst = stages[worst_name]
    capacity = gpu_mem_gib * GIB
    tokens_per_day = mfu * peak_tflops * 1e12 * gpus * 86400.0 / flops["model"]
    tokens_per_step = lay.global_batch_size * lay.data_seq_len
    notes = []
    if cfg.parallel.sequence_parallel and cfg.parallel.tp == 1:
        notes.append("parallel.sequence_parallel has no effect at tp=1")
    return {
        "layout": asdict(lay),
        "model": asdict(dm),
        "params": params,
        "flops_per_token": flops["model"],
        "hardware_flops_per_token": flops["hardware"],
        "memory": {
            "stage": worst_name,
            **{k_: worst[k_] for k_ in ("params", "expert_states", "weights", "gradients", "optimizer", "zero_buffers",
                                       "activation_peak", "modeled_peak", "overhead", "total")},
            "activations": worst["activations"],
            "overhead_gib": overhead_gib,
            "fragmentation": fragmentation,
            "capacity": capacity,
            "fits": worst["total"] <= capacity,
            "headroom": capacity - worst["total"],
        },
        "stages": stages,
        "all_to_all": all_to_all_volume(dm, lay, e),
        "throughput": {
            "mfu": mfu,
            "peak_tflops": peak_tflops,
            "tokens_per_day": tokens_per_day,
            "tokens_per_sec": tokens_per_day / 86400.0,
            "step_seconds": tokens_per_step / (tokens_per_day / 86400.0),
            "tokens_per_step": tokens_per_step,
        },
        "notes": notes,
    }


# ---------------------------------------------------------------------------------------
# Text report


def _gib(x: float) -> str:
    return f"{x / GIB:8.2f} GiB"


def _count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3f}{unit}"
    return f"{n:.0f}"


def _state_note(lay: dict, term: str) -> str:
    """What one state term holds for the layout's engine and precision (format_plan)."""
    bf16, z, meg = lay["precision"] == "bf16", lay["zero_stage"], lay["engine"] == "megatron"
    if term == "weights":
        return ("bf16" if bf16 else "fp32") if meg or z > 0 or not bf16 else "fp32 + bf16 autocast copies"
    if term == "gradients":
        return "fp32 buffer" if meg else "fp32" + (" accumulator" if bf16 else "")
    return "AdamW " + ("fp32 master + m + v" if bf16 and (meg or z > 0) else "m + v" + (" + fp32 partition copy" if z > 0 and not meg else ""))


def _moe_lines(p: dict) -> list[str]:
    par, dm, lay = p["params"], p["model"], p["layout"]
    if not dm["moe_layers"]:
        return []
    a2a = p["all_to_all"]
    return [
        f"mixture of experts: {dm['moe_layers']} MoE layers x {dm['experts']} experts (top-{dm['topk']}); "
        f"active {_count(par['active'])} of {_count(par['total'])} parameters per token; experts {_count(par['experts'])}, "
        f"per GPU {_count(par['per_gpu_experts'])} (ep {lay['ep']}), their weights + gradients + optimizer "
        f"{p['memory']['expert_states'] / GIB:.2f} GiB",
        f"all-to-all per GPU and step (ep {lay['ep']}): {a2a['bytes_per_step'] / GIB:.2f} GiB "
        f"({a2a['bytes_per_token'] / 2**10:.1f} KiB per token)",
    ]


def format_plan(p: dict) -> str:
    lay, mem, par, thr = p["layout"], p["memory"], p["params"], p["throughput"]
    act = mem["activations"]
    zero_what = {0: "ZeRO-0: nothing partitioned", 1: "ZeRO-1 partitions optimizer states over dp",
                 2: "ZeRO-2 partitions optimizer states + gradients over dp",
                 3: "ZeRO-3 partitions optimizer states + gradients + weights over dp"}[lay["zero_stage"]]
    lines = [
        f"layout: {lay['gpus']} GPUs = tp {lay['tp']} x pp {lay['pp']} x dp {lay['dp']}"
        f"{' (sequence parallel)' if lay['sequence_parallel'] else ''}; {zero_what}"
        f" [{lay['optimizer_engine']}]",
        f"batch:  micro {lay['micro_batch_size']} x {lay['num_microbatches']} microbatches x dp {lay['dp']} = global "
        f"{lay['global_batch_size']} sequences of {lay['data_seq_len']} tokens (model sequence {lay['model_seq_len']}, "
        f"objective {lay['objective']})",
        f"kernels: {lay['kernels']} layers, {lay['attention']} attention, recompute {lay['recompute']}, {lay['precision']}",
        "",
        f"parameters: {_count(par['total'])} total ({par['total']:,}); per GPU {_count(par['per_gpu'])}"
        + (f" (first stage {_count(par['per_gpu_first_stage'])}, last stage {_count(par['per_gpu_last_stage'])})"
           if lay["pp"] > 1 else ""),
        *_moe_lines(p),
        f"FLOPs per token (training, incl. attention): {p['flops_per_token']:.4g}"
        f"  (with recompute: {p['hardware_flops_per_token']:.4g})",
        "",
        f"memory per GPU ({'pipeline stage: ' + mem['stage'] if lay['pp'] > 1 else 'all stages'}):",
        f"  weights              {_gib(mem['weights'])}   ({_state_note(lay, 'weights')})",
        f"  gradients            {_gib(mem['gradients'])}   ({_state_note(lay, 'gradients')})",
        f"  optimizer states     {_gib(mem['optimizer'])}   ({_state_note(lay, 'optimizer')})",
    ]
    if mem["zero_buffers"]:
        lines.append(f"  ZeRO buffers         {_gib(mem['zero_buffers'])}")
    lines += [
        f"  activations (saved)  {_gib(act['saved_layers'] + act['saved_other'] + act['persistent_buffers'])}"
        f"   ({act['in_flight_microbatches']} microbatch(es) in flight x {act['layers_on_stage']} layers x "
        f"{act['per_layer_per_token'] * lay['micro_batch_size'] * lay['model_seq_len'] / 2**20:.1f} MiB/layer)",
        f"  logits + CE buffers  {_gib(act['logits_ce'])}",
        f"  backward working set {_gib(act['backward_working'])}",
        f"  -> activation peak   {_gib(act['peak'])}   (at {act['peak_phase']})",
    ]
    lines += [
        f"  modeled peak         {_gib(mem['modeled_peak'])}",
        f"  overhead allowance   {_gib(mem['overhead'])}   ({mem['fragmentation']:.0%} fragmentation + "
        f"{mem['overhead_gib']:g} GiB CUDA context/NCCL/workspaces)",
        f"  total                {_gib(mem['total'])}   of {mem['capacity'] / GIB:g} GiB -> "
        + ("FITS" if mem["fits"] else "DOES NOT FIT") + f" (headroom {mem['headroom'] / GIB:.2f} GiB; "
        f"{mem['total'] / mem['capacity']:.0%} of the GPU, presets aim at <= {PRESET_TARGET:.0%})",
        "",
        f"throughput: {thr['tokens_per_day'] / 1e9:.2f}B tokens/day ({thr['tokens_per_sec']:,.0f} tokens/s) at MFU "
        f"{thr['mfu']:g} x {thr['peak_tflops']:g} TFLOP/s x {lay['gpus']} GPUs; {thr['step_seconds']:.2f} s per step",
    ]
    for n in p["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)
