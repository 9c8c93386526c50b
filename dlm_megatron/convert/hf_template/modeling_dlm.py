"""A diffusion language model exported by dlm_megatron, for ``transformers`` (trust_remote_code).

Self-contained (torch + transformers only). The network is a pre-norm Llama-style
transformer: RMSNorm, rotary position embeddings (rotate-half layout), grouped-query
attention (q/k/v biases when ``include_qkv_bias``), SwiGLU MLP, untied (or tied) output head. Parameter names follow
LLaDA's published layout::

    model.transformer.wte.weight                      token embedding [embedding_size, d_model]
    model.transformer.blocks.{i}.attn_norm.weight     RMSNorm before attention
    model.transformer.blocks.{i}.{q,k,v}_proj.weight  attention projections
    model.transformer.blocks.{i}.attn_out.weight      attention output projection
    model.transformer.blocks.{i}.ff_norm.weight       RMSNorm before the MLP
    model.transformer.blocks.{i}.ff_proj.weight       SwiGLU gate (silu applied)
    model.transformer.blocks.{i}.up_proj.weight       SwiGLU up
    model.transformer.blocks.{i}.ff_out.weight        MLP down projection
    model.transformer.ln_f.weight                     final RMSNorm
    model.transformer.ff_out.weight                   output head (absent when weight_tying)

With ``qk_norm``: ``blocks.{i}.{q,k}_norm.weight``, RMSNorm of each head's q and k before
RoPE. Mixture-of-experts layers (``moe_layers[i] == 1``) replace the MLP by ``blocks.{i}.moe``:
``gate.weight`` [experts, d_model] (router; ``gate.expert_bias`` for aux-free routing),
``experts.{e}.{ff_proj,up_proj,ff_out}.weight`` and an optional ``shared_expert``.

Attention is bidirectional (the denoiser sees the whole sequence) unless
``config.objective == "ar"``. ``forward`` returns logits over ``embedding_size`` columns
(the vocabulary padded for efficient matmuls); ids >= ``vocab_size`` are never tokens.

``generate()`` is the masked-diffusion sampler the checkpoint was trained for: the
generation region starts as [MASK] tokens and is denoised block by block
(semi-autoregressive), committing the most confident predictions at every step
(LLaDA's low-confidence remasking). It takes dlm_megatron's sampler knobs with the same
names, defaults and random stream (acceptance and ReMDM renoising profiles, temperature
schedule, Fast-dLLM prefix/dual cache and parallel threshold, classifier-free guidance,
stop-at-EOS), so the same call gives the framework's tokens. Block-diffusion checkpoints (``config.block_size``)
are sampled on their training grid: each block sees itself bidirectionally and every
earlier clean token, earlier blocks see each other block-causally. Finished blocks never
change, so their keys/values are cached (``use_cache=True``, the default; ``False``
recomputes the whole prefix at every step, the reference the cache is tested against).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_dlm import DLMConfig

try:  # transformers >= 5: init functions that respect already-loaded weights
    from transformers import initialization as _init
except ImportError:  # transformers 4.x
    _init = nn.init


class DLMRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def head_dim_of(config: DLMConfig) -> int:
    """One head's width: config.head_dim (n_heads * head_dim may differ from d_model, as in
    Qwen3); configs written before the key existed mean d_model / n_heads."""
    return getattr(config, "head_dim", None) or config.d_model // config.n_heads


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, 1, S, head_dim] (fp32) for integer positions [B, S]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


def _check_knobs(*, acceptance_profile: str, renoise_profile: str, renoise_eta: float, renoise_t_on: float,
                 renoise_t_off: float, renoise_alpha_on: float, renoise_prob: float, cache: str, block_checkpoint: bool,
                 parallel_threshold: Optional[float], confidence_threshold: Optional[float],
                 cfg_scale: float) -> tuple[str, float]:
    """generate()'s sampler knobs checked as dlm_megatron checks them (same messages);
    returns (renoise_profile, renoise_eta) with renoise_prob resolved to its alias."""
    if acceptance_profile not in ("linear", "cosine"):
        raise ValueError(f"acceptance_profile must be linear or cosine, got {acceptance_profile!r}")
    if renoise_profile not in ("none", "constant", "cap", "rescale", "loop"):
        raise ValueError(f"renoise_profile must be none, constant, cap, rescale or loop, got {renoise_profile!r}")
    if renoise_prob > 0.0:
        if renoise_profile != "none":
            raise ValueError("renoise_prob is an alias of renoise_profile='constant' with renoise_eta=renoise_prob; set one")
        renoise_profile, renoise_eta = "constant", renoise_prob
    if cache not in ("none", "prefix", "dual"):
        raise ValueError(f"cache must be none, prefix or dual, got {cache!r}")
    if cache != "none" and block_checkpoint:
        raise ValueError("cache is the masked sampler's Fast-dLLM cache; block checkpoints cache finished blocks (use_cache)")
    if parallel_threshold is not None and (renoise_profile != "none" or confidence_threshold is not None):
        raise ValueError("parallel_threshold ignores the step schedule: use it without renoising or confidence_threshold")
    if not (cfg_scale >= 0 and math.isfinite(cfg_scale)):
        raise ValueError(f"cfg_scale must be a finite value >= 0, got {cfg_scale}")
    if not 0.0 <= renoise_eta < 1.0:
        raise ValueError(f"renoise_eta must be in [0, 1), got {renoise_eta}")
    if not (0.0 <= renoise_t_off < renoise_t_on <= 1.0) or not (0.0 < renoise_alpha_on < 1.0):
        raise ValueError("loop needs 0 <= renoise_t_off < renoise_t_on <= 1 and 0 < renoise_alpha_on < 1, got "
                         f"{renoise_t_off}, {renoise_t_on}, {renoise_alpha_on}")
    if parallel_threshold is not None and not (0.0 <= parallel_threshold <= 1.0):
        raise ValueError(f"parallel_threshold must be in [0, 1], got {parallel_threshold}")
    return renoise_profile, renoise_eta


class DLMExpert(nn.Module):
    """One SwiGLU MLP (an expert, or the shared expert)."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.ff_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.ff_out = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff_out(F.silu(self.ff_proj(x)) * self.up_proj(x))


class DLMMoE(nn.Module):
    """Top-k mixture of experts with the router of megatron-core (which trained it)."""

    def __init__(self, config: DLMConfig):
        super().__init__()
        d, E = config.d_model, config.moe_num_experts
        self.config = config
        self.gate = nn.Linear(d, E, bias=False)
        if config.moe_expert_bias:
            self.gate.register_buffer("expert_bias", torch.zeros(E))
        self.experts = nn.ModuleList([DLMExpert(d, config.moe_intermediate_size) for _ in range(E)])
        fs = config.moe_shared_expert_intermediate_size
        self.shared_expert = DLMExpert(d, fs) if fs else None

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 router logits [N, E] -> (weights [N, k], expert ids [N, k])."""
        c, k = self.config, self.config.moe_top_k
        if c.moe_score_function == "sigmoid":
            scores = torch.sigmoid(logits)
            choose = scores + self.gate.expert_bias if c.moe_expert_bias else scores
            idx = choose.topk(k, dim=-1).indices
            w = scores.gather(-1, idx)
            return (w / (w.sum(-1, keepdim=True) + 1e-20) if k > 1 else w), idx
        if c.moe_pre_softmax:
            return torch.softmax(logits, dim=-1).topk(k, dim=-1)
        top, idx = logits.topk(k, dim=-1)
        return torch.softmax(top, dim=-1), idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, d = x.shape
        flat = x.reshape(-1, d)
        weights, idx = self.route(F.linear(flat.float(), self.gate.weight.float()))
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(flat[rows]) * weights[rows, slot, None].to(flat.dtype))
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        return out.reshape(B, S, d)


class DLMBlock(nn.Module):
    """One pre-norm transformer layer (LLaDA's "llama" block)."""

    def __init__(self, config: DLMConfig, layer_id: int):
        super().__init__()
        d, nh, nkv = config.d_model, config.n_heads, config.n_kv_heads
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = nh, nkv, head_dim_of(config)
        self.attn_norm = DLMRMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, nh * self.head_dim, bias=config.include_qkv_bias)
        self.k_proj = nn.Linear(d, nkv * self.head_dim, bias=config.include_qkv_bias)
        self.v_proj = nn.Linear(d, nkv * self.head_dim, bias=config.include_qkv_bias)
        self.attn_out = nn.Linear(nh * self.head_dim, d, bias=config.include_bias)
        self.ff_norm = DLMRMSNorm(d, config.rms_norm_eps)
        if getattr(config, "qk_norm", False):
            self.q_norm = DLMRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = DLMRMSNorm(self.head_dim, config.rms_norm_eps)
        moe_layers = getattr(config, "moe_layers", None) or []
        if layer_id < len(moe_layers) and moe_layers[layer_id]:
            self.moe = DLMMoE(config)
        else:
            self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=config.include_bias)
            self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=config.include_bias)
            self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=config.include_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: Optional[torch.Tensor],
                past: Optional[tuple] = None, after: Optional[tuple] = None):
        """x [B, S, d] -> (x, (k, v)): keys/values [B, kv_heads, C + S, head_dim] including the
        ``past`` ones (C cached earlier positions, prepended); ``after``: cached keys/values of
        later positions, appended for attention only (Fast-dLLM's dual cache)."""
        B, S, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        kv = (k, v)
        if after is not None:
            k, v = torch.cat([k, after[0]], dim=2), torch.cat([v, after[1]], dim=2)
        if self.n_kv_heads != self.n_heads:  # query head j reads key/value head j // (heads / kv_heads)
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=1.0 / math.sqrt(self.head_dim))
        x = x + self.attn_out(att.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))
        h = self.ff_norm(x)
        if hasattr(self, "moe"):
            return x + self.moe(h), kv
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h)), kv


class DLMModel(nn.Module):
    """Embedding, blocks, final norm and head under LLaDA's ``transformer`` ModuleDict."""

    def __init__(self, config: DLMConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.embedding_size, config.d_model),
            blocks=nn.ModuleList([DLMBlock(config, i) for i in range(config.n_layers)]),
            ln_f=DLMRMSNorm(config.d_model, config.rms_norm_eps),
        ))
        if not config.weight_tying:
            self.transformer["ff_out"] = nn.Linear(config.d_model, config.embedding_size, bias=False)

    def forward(self, input_ids: torch.Tensor, allowed: Optional[torch.Tensor], position_ids: torch.Tensor,
                output_hidden_states: bool = False, past: Optional[list] = None, kv_out: Optional[list] = None,
                after: Optional[list] = None):
        """``past``: per layer (k, v) of earlier positions to attend to (``allowed`` then has
        C + S key columns); ``after``: per layer (k, v) of later positions (no mask allowed);
        ``kv_out``: a list that receives each layer's (k, v), past included."""
        x = self.transformer.wte(input_ids)
        cos, sin = rotary_cos_sin(position_ids, head_dim_of(self.config), self.config.rope_theta)
        hidden = [x] if output_hidden_states else None
        for i, block in enumerate(self.transformer.blocks):
            x, kv = block(x, cos, sin, allowed, None if past is None else past[i], None if after is None else after[i])
            if kv_out is not None:
                kv_out.append(kv)
            if hidden is not None:
                hidden.append(x)
        x = self.transformer.ln_f(x)
        head = self.transformer.wte.weight if self.config.weight_tying else self.transformer.ff_out.weight
        return F.linear(x, head), (tuple(hidden) if hidden is not None else None)


def block_causal_allowed(n: int, block_size: int, device=None) -> torch.Tensor:
    """[1, 1, n, n] bool, True where query i may attend key j: block(j) <= block(i)."""
    blk = torch.arange(n, device=device) // block_size
    return (blk[None, :] <= blk[:, None])[None, None]


class DLMPreTrainedModel(PreTrainedModel):
    config_class = DLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["DLMBlock"]
    _supports_sdpa = True
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            _init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, DLMRMSNorm):
            _init.ones_(module.weight)


class DLMModelLM(DLMPreTrainedModel):
    """The denoiser: token ids (with [MASK] where unknown) -> logits at every position."""

    def __init__(self, config: DLMConfig):
        super().__init__(config)
        self.model = DLMModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def set_input_embeddings(self, value):
        self.model.transformer.wte = value

    def get_output_embeddings(self):
        return None if self.config.weight_tying else self.model.transformer.ff_out

    def _allowed(self, attention_mask: Optional[torch.Tensor], B: int, S: int, device) -> Optional[torch.Tensor]:
        """Combine the objective's mask and the caller's into one bool [B|1, 1, S, S] (True = attend)."""
        allowed = None
        if self.config.objective == "ar":
            allowed = torch.ones(S, S, dtype=torch.bool, device=device).tril()[None, None]
        if attention_mask is not None:
            if attention_mask.dim() == 2:  # [B, S] padding mask, 1 = real token
                m = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
            elif attention_mask.dim() == 4:  # [B|1, 1, S, S], bool True = attend, or additive float
                m = attention_mask.to(device) if attention_mask.dtype == torch.bool else attention_mask.to(device) > -1e4
            else:
                raise ValueError(f"attention_mask must be [B, S] or [B, 1, S, S], got shape {tuple(attention_mask.shape)}")
            allowed = m if allowed is None else (allowed & m)
        return allowed

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        """input_ids [B, S]; attention_mask [B, S] (1 = token, 0 = padding) or [B|1, 1, S, S]
        (bool, True = may attend); position_ids [B, S] (default 0..S-1).
        Returns MaskedLMOutput with logits [B, S, embedding_size]."""
        B, S = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device).expand(B, S)
        allowed = self._allowed(attention_mask, B, S, input_ids.device)
        logits, hidden = self.model(input_ids, allowed, position_ids, bool(output_hidden_states))
        if return_dict is False:
            return (logits,) if hidden is None else (logits, hidden)
        return MaskedLMOutput(logits=logits, hidden_states=hidden)

    # ------------------------------------------------------------------------------------
    # Sampling (the same knobs and the same random stream as dlm_megatron.sampling)

    def _denoiser_logits(self, tokens: torch.Tensor, allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits over the real vocabulary, float32, token i read from output i-1 when shifted."""
        logits = self.forward(tokens, attention_mask=allowed).logits
        if self.config.shift_logits:  # token i is predicted by output i-1
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits[..., : self.config.vocab_size].float()

    @staticmethod
    def _temperature(temperature: float, schedule: str, t: float) -> float:
        if schedule == "constant":
            return temperature
        if schedule == "linear":
            return temperature * t
        if schedule == "cosine":
            return temperature * 0.5 * (1.0 - math.cos(math.pi * t))
        raise ValueError(f"temperature_schedule must be constant, linear or cosine, got {schedule!r}")

    @staticmethod
    def _accept(u: float, profile: str) -> float:
        """Acceptance profile F(u): linear u, cosine 1 - cos(pi u / 2)."""
        if u >= 1.0:
            return 1.0
        if u <= 0.0:
            return 0.0
        return u if profile == "linear" else 1.0 - math.cos(0.5 * math.pi * u)

    @classmethod
    def _alpha(cls, t: float, k: dict) -> float:
        """Committed fraction at noise level t (ReMDM-loop: alpha_on held on [t_off, t_on])."""
        prof = k["acceptance_profile"]
        if k["renoise_profile"] != "loop":
            return cls._accept(1.0 - t, prof)
        t_on, t_off, a_on = k["renoise_t_on"], k["renoise_t_off"], k["renoise_alpha_on"]
        if t >= t_on:
            return a_on * cls._accept((1.0 - t) / (1.0 - t_on), prof) if t_on < 1.0 else 0.0
        if t >= t_off:
            return a_on
        return a_on + (1.0 - a_on) * cls._accept((t_off - t) / t_off, prof)

    @classmethod
    def _renoise_rate(cls, i: int, steps: int, k: dict) -> float:
        """ReMDM sigma at step i: constant eta, cap min(eta, (1-a_s)/a_t), rescale eta*min(1, (1-a_s)/a_t),
        loop eta for t_off < t <= t_on."""
        profile, eta = k["renoise_profile"], k["renoise_eta"]
        if profile == "none" or eta <= 0.0 or k["parallel_threshold"] is not None:
            return 0.0
        if profile == "constant":
            return eta
        if profile == "loop":
            t = 1.0 - i / steps
            return eta if (i < steps - 1 and k["renoise_t_off"] < t <= k["renoise_t_on"]) else 0.0
        a_t, a_s = cls._alpha(1.0 - i / steps, k), cls._alpha(1.0 - (i + 1) / steps, k)
        bound = min(1.0, (1.0 - a_s) / a_t) if a_t > 0.0 else 1.0
        return min(eta, bound) if profile == "cap" else eta * bound

    @classmethod
    def _commit_count(cls, masked: torch.Tensor, total: torch.Tensor, i: int, steps: int, k: dict) -> torch.Tensor:
        """How many to commit at step i of steps: linear ceil(m / (steps - i)); cosine/loop
        m - floor(M (1 - alpha_s)); the last step everything."""
        count = masked.sum(dim=1)
        if i >= steps - 1:
            return count
        if k["acceptance_profile"] == "linear" and k["renoise_profile"] != "loop":
            left = steps - i
            return torch.div(count, left, rounding_mode="floor") + (count % left > 0).long()
        a_s = cls._alpha(1.0 - (i + 1) / steps, k)
        keep = torch.floor(total.double() * (1.0 - a_s) + 1e-9).long()
        return torch.clamp(count - keep, min=0)

    @classmethod
    def _step(cls, logits: torch.Tensor, masked: torch.Tensor, total: torch.Tensor, i: int, steps: int, temperature: float,
              k: dict, suppress: Sequence[int], generator: torch.Generator):
        """One denoising step on a block: candidates [B, K] and which of them to commit [B, K]."""
        logits = logits.double().index_fill(-1, torch.tensor(list(suppress), device=logits.device), -math.inf)
        if temperature > 0:  # Gumbel-max sampling, float64 noise from a CPU generator
            u = torch.rand(tuple(logits.shape), generator=generator, dtype=torch.float64).to(logits.device)
            gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))
            x0 = (logits / temperature + gumbel).argmax(dim=-1)
        else:
            x0 = logits.argmax(dim=-1)
        probs = F.softmax(logits, dim=-1)
        remasking = k["remasking"]
        if remasking == "low_confidence":
            score = probs.gather(-1, x0[..., None])[..., 0]
        elif remasking == "margin":
            top2 = probs.topk(2, dim=-1).values
            score = top2[..., 0] - top2[..., 1]
        elif remasking == "entropy":
            score = torch.special.xlogy(probs, probs).sum(dim=-1)
        elif remasking == "random":
            score = torch.rand(tuple(x0.shape), generator=generator, dtype=torch.float64).to(probs.device).to(probs.dtype)
        else:
            raise ValueError(f"remasking must be low_confidence, margin, entropy or random, got {remasking!r}")
        if k["parallel_threshold"] is not None:  # Fast-dLLM: every confident position, at least one
            n = torch.maximum(((score >= k["parallel_threshold"]) & masked).sum(dim=1), masked.any(dim=1).long())
        else:
            n = cls._commit_count(masked, total, i, steps, k)
            if k["confidence_threshold"] is not None:
                n_conf = ((score >= k["confidence_threshold"]) & masked).sum(dim=1)
                n = torch.maximum(torch.maximum(n, n_conf), masked.any(dim=1).long())
        score = score.masked_fill(~masked, -math.inf)
        order = score.argsort(dim=-1, descending=True, stable=True)  # ties: leftmost first
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        return x0, (ranks < n[:, None]) & masked

    @staticmethod
    def _renoise(x_blk: torch.Tensor, committed: torch.Tensor, sigma: float, mask_id: int, generator: torch.Generator):
        """Mask each committed token again with probability sigma (float64 uniforms, CPU generator)."""
        if sigma <= 0.0 or not bool(committed.any()):
            return x_blk, committed
        remask = committed & (torch.rand(tuple(committed.shape), generator=generator, dtype=torch.float64).to(committed.device) < sigma)
        return x_blk.masked_fill(remask, mask_id), committed & ~remask

    @staticmethod
    def _fill_after_eos(blk: torch.Tensor, eos: int, generated: Optional[torch.Tensor] = None) -> torch.Tensor:
        """stop_at_eos: positions of the block after its first generated EOS (bool [B, K])."""
        is_eos = blk == eos
        if generated is not None:
            is_eos = is_eos & generated[None, :]
        fill = (is_eos.long().cumsum(dim=1) > 0) & ~is_eos
        return fill if generated is None else fill & generated[None, :]

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        gen_length: int = 64,
        steps: Optional[int] = None,
        block_length: Optional[int] = None,
        temperature: float = 0.0,
        temperature_schedule: str = "constant",
        remasking: str = "low_confidence",
        confidence_threshold: Optional[float] = None,
        seed: int = 0,
        eos_token_id: Optional[int] = None,
        suppress_token_ids: Optional[Sequence[int]] = None,
        use_cache: bool = True,
        acceptance_profile: str = "linear",
        renoise_profile: str = "none",
        renoise_eta: float = 0.02,
        renoise_t_on: float = 0.55,
        renoise_t_off: float = 0.05,
        renoise_alpha_on: float = 0.9,
        renoise_prob: float = 0.0,
        cache: str = "none",
        parallel_threshold: Optional[float] = None,
        cfg_scale: float = 0.0,
        stop_at_eos: bool = False,
        **kwargs,
    ) -> torch.LongTensor:
        """Masked-diffusion generation of ``gen_length`` tokens after ``input_ids`` [B, P]
        (prompts of equal length). Returns [B, P + gen_length]. The knobs are dlm_megatron's
        (same names, same defaults, same tokens for the same seed):

        steps: denoising steps N in total (default gen_length), split evenly over the blocks;
        block_length: semi-autoregressive block length (default: the trained block size of a
        block-diffusion checkpoint, else gen_length); temperature T0 (0 = greedy) with
        temperature_schedule constant | linear (T0 t) | cosine (T0 (1 - cos(pi t)) / 2);
        remasking: which predictions are committed first (low_confidence, margin, entropy,
        random); acceptance_profile: fraction of a block committed after step n of K, linear
        n/K (LLaDA) or cosine 1 - cos(pi n / 2K) (MaskGIT); renoise_profile none | constant |
        cap | rescale | loop with renoise_eta (and renoise_t_on / renoise_t_off /
        renoise_alpha_on for loop): ReMDM remasking of committed tokens (renoise_prob p is
        constant with eta p); confidence_threshold: also commit every prediction at least this
        confident; parallel_threshold: Fast-dLLM's policy, every prediction at least this
        confident and at least one, ignoring the step schedule; cache none | prefix | dual:
        Fast-dLLM's KV cache for masked checkpoints, refreshed when each block starts;
        cfg_scale W: classifier-free guidance u + (1 + W)(c - u), u with the prompt masked;
        stop_at_eos: a committed EOS also fills the rest of its block;
        eos_token_id (default config.eos_token_id): rows that produced it get their later
        blocks filled with it; suppress_token_ids (default: [pad]) are never sampled, nor is
        the mask token; use_cache (block-diffusion checkpoints): keep finished blocks'
        keys/values instead of recomputing the prefix at every step."""
        cfg = self.config
        if cfg.objective in ("uniform", "hybrid", "ar"):
            raise NotImplementedError(f"generate() implements masked and block diffusion; this checkpoint's objective is {cfg.objective!r}")
        if cfg.mask_token_id is None:
            raise ValueError("config.mask_token_id is not set")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, P], got shape {tuple(input_ids.shape)}")
        block_size = cfg.block_size if cfg.objective == "block" else None
        if block_length is None:
            block_length = block_size or gen_length
        if block_size is not None and block_length != block_size:
            raise ValueError(f"this block-diffusion checkpoint was trained with block_size={block_size}; block_length must match")
        steps = gen_length if steps is None else steps
        if gen_length % block_length:
            raise ValueError(f"gen_length ({gen_length}) must be divisible by block_length ({block_length})")
        num_blocks = gen_length // block_length
        if steps < 1 or steps % num_blocks:
            raise ValueError(f"steps ({steps}) must be a positive multiple of the number of blocks ({num_blocks})")
        renoise_profile, renoise_eta = _check_knobs(
            acceptance_profile=acceptance_profile, renoise_profile=renoise_profile, renoise_eta=renoise_eta,
            renoise_t_on=renoise_t_on, renoise_t_off=renoise_t_off, renoise_alpha_on=renoise_alpha_on,
            renoise_prob=renoise_prob, cache=cache, block_checkpoint=block_size is not None,
            parallel_threshold=parallel_threshold, confidence_threshold=confidence_threshold, cfg_scale=cfg_scale)
        steps_per_block = steps // num_blocks
        eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
        if stop_at_eos and eos is None:
            raise ValueError("stop_at_eos needs an eos_token_id")
        if suppress_token_ids is None:
            suppress_token_ids = [] if cfg.pad_token_id is None else [cfg.pad_token_id]
        knobs = dict(remasking=remasking, confidence_threshold=confidence_threshold, acceptance_profile=acceptance_profile,
                     renoise_profile=renoise_profile, renoise_eta=renoise_eta, renoise_t_on=renoise_t_on,
                     renoise_t_off=renoise_t_off, renoise_alpha_on=renoise_alpha_on, parallel_threshold=parallel_threshold,
                     temperature=temperature, temperature_schedule=temperature_schedule, cfg_scale=cfg_scale,
                     stop_at_eos=stop_at_eos)
        suppress = sorted({int(cfg.mask_token_id), *(int(i) for i in suppress_token_ids)})
        generator = torch.Generator().manual_seed(seed)
        if block_size is not None:
            return self._generate_blocks(input_ids, gen_length, block_size, steps_per_block, eos, knobs, suppress, generator,
                                         use_cache=use_cache)
        return self._generate_masked(input_ids, gen_length, block_length, num_blocks, steps_per_block, eos, knobs, suppress,
                                     generator, cache)

    def _guided(self, logits: torch.Tensor, B: int, scale: float) -> torch.Tensor:
        """Rows [cond; uncond] -> u + (1 + W)(c - u) (float32, as the framework)."""
        if scale <= 0.0:
            return logits
        cond, unc = logits[:B], logits[B:]
        return unc + (1.0 + scale) * (cond - unc)

    def _window_logits(self, tokens: torch.Tensor, a: int, lo: int, hi: int, past, after) -> torch.Tensor:
        """Logits of positions [lo, hi) from running positions [a, a + N) with cached keys/values."""
        B, N = tokens.shape
        pos = torch.arange(a, a + N, device=tokens.device).expand(B, N)
        kv: list = []
        out, _ = self.model(tokens, None, pos, past=past, after=after, kv_out=kv)
        out = out[..., : self.config.vocab_size].float()
        if self.config.shift_logits:
            idx = (torch.arange(lo, hi, device=out.device) - 1).clamp_min(0) - a
            return out[:, idx]
        return out[:, lo - a: hi - a]

    def _generate_masked(self, input_ids, gen_length, block_length, num_blocks, k, eos, knobs, suppress, generator, cache):
        mask_id, device = self.config.mask_token_id, input_ids.device
        B, P = input_ids.shape
        S = P + gen_length
        x = torch.full((B, S), mask_id, dtype=torch.long, device=device)
        x[:, :P] = input_ids
        done = torch.zeros(B, dtype=torch.bool, device=device)
        W, thr = knobs["cfg_scale"], knobs["parallel_threshold"]
        shift = 1 if self.config.shift_logits else 0

        def rows(x):  # a shifted model's token 0 stays clean in the unconditional row, as in training
            return torch.cat([x, x.index_fill(1, torch.arange(shift, P, device=x.device), mask_id)]) if W > 0 else x

        for b in range(num_blocks):
            lo, hi = P + b * block_length, P + (b + 1) * block_length
            committed = torch.zeros(B, block_length, dtype=torch.bool, device=device)
            total = (x[:, lo:hi] == mask_id).sum(dim=1)
            kv: list = []
            for i in range(max(k, block_length) if thr is not None else k):
                x[:, lo:hi], committed = self._renoise(x[:, lo:hi], committed, self._renoise_rate(i, k, knobs), mask_id, generator)
                masked = x[:, lo:hi] == mask_id
                if not bool(masked.any()):
                    break
                if cache == "none":
                    logits = self._denoiser_logits(rows(x))[:, lo:hi]
                elif i == 0:  # Fast-dLLM: a full forward refreshes every position's keys/values
                    kv = []
                    full, _ = self.model(rows(x), None, torch.arange(S, device=device).expand(rows(x).shape[0], S), kv_out=kv)
                    full = full[..., : self.config.vocab_size].float()
                    if shift:
                        full = torch.cat([full[:, :1], full[:, :-1]], dim=1)
                    logits = full[:, lo:hi]
                else:
                    a = max(lo - shift, 0)
                    e = hi if cache == "dual" else S
                    past = [(kk[:, :, :a], vv[:, :, :a]) for kk, vv in kv]
                    after = [(kk[:, :, e:], vv[:, :, e:]) for kk, vv in kv] if cache == "dual" else None
                    logits = self._window_logits(rows(x)[:, a:e], a, lo, hi, past, after)
                logits = self._guided(logits, B, W)
                t = float(masked.sum(dim=1).max()) / block_length if thr is not None else 1.0 - i / k
                temp = self._temperature(knobs["temperature"], knobs["temperature_schedule"], t)
                x0, commit = self._step(logits, masked, total, i, k, temp, knobs, suppress, generator)
                x[:, lo:hi] = torch.where(commit, x0, x[:, lo:hi])
                committed |= commit
                if knobs["stop_at_eos"]:
                    fill = self._fill_after_eos(x[:, lo:hi], eos)
                    x[:, lo:hi] = x[:, lo:hi].masked_fill(fill, eos)
                    committed &= ~fill
            if eos is not None:
                done |= (x[:, P:hi] == eos).any(dim=1)
                tail = x[:, hi:]
                x[:, hi:] = torch.where(done[:, None] & (tail == mask_id), eos, tail)
                if bool(done.all()):
                    break
        return x

    def _cached_logits(self, tokens: torch.Tensor, start: int, past: Optional[list], allowed: Optional[torch.Tensor],
                       kv_out: Optional[list] = None) -> torch.Tensor:
        """Logits of ``tokens`` [B, N] at positions start..start+N-1 after ``past`` (start cached positions), float32."""
        B, N = tokens.shape
        pos = torch.arange(start, start + N, device=tokens.device).expand(B, N)
        logits, _ = self.model(tokens, allowed, pos, past=past, kv_out=kv_out)
        return logits[..., : self.config.vocab_size].float()

    def _generate_blocks(self, input_ids, gen_length, bs, k, eos, knobs, suppress, generator, use_cache=True):
        """Block diffusion on the training grid (block j = positions [j*bs, (j+1)*bs))."""
        mask_id, device = self.config.mask_token_id, input_ids.device
        B, P = input_ids.shape
        total_len = P + gen_length
        first, end = P // bs * bs, -(-total_len // bs) * bs
        x = torch.full((B, end), mask_id, dtype=torch.long, device=device)
        x[:, :P] = input_ids
        done = torch.zeros(B, dtype=torch.bool, device=device)
        past = None  # per layer (k, v) of x[:, :lo]: finished blocks, block-causal among themselves
        W, thr = knobs["cfg_scale"], knobs["parallel_threshold"]

        def rows(tokens, start):  # with guidance, also the prompt-masked copy of these positions
            if W <= 0:
                return tokens
            unc = tokens.clone()
            unc[:, : max(0, min(P - start, unc.shape[1]))] = mask_id
            return torch.cat([tokens, unc])

        def commit(lo: int, hi: int):
            nonlocal past
            kv: list = []
            self._cached_logits(rows(x[:, lo:hi], lo), lo, past, block_causal_allowed(hi, bs, device)[..., lo:, :], kv)
            past = kv

        if use_cache and first > 0:
            commit(0, first)  # the prompt's whole blocks
        for lo in range(first, end, bs):
            hi = lo + bs
            if eos is not None:
                blk = x[:, lo:hi]
                x[:, lo:hi] = torch.where(done[:, None] & (blk == mask_id), eos, blk)
            allowed = block_causal_allowed(hi, bs, device)
            committed = torch.zeros(B, bs, dtype=torch.bool, device=device)
            total = (x[:, lo:hi] == mask_id).sum(dim=1)
            generated = torch.arange(lo, hi, device=device) >= P
            for i in range(max(k, bs) if thr is not None else k):
                x[:, lo:hi], committed = self._renoise(x[:, lo:hi], committed, self._renoise_rate(i, k, knobs), mask_id, generator)
                masked = x[:, lo:hi] == mask_id
                if not bool(masked.any()):
                    break
                if use_cache:  # the block sees every cached position and itself: no mask needed
                    logits = self._cached_logits(rows(x[:, lo:hi], lo), lo, past, None)
                else:
                    logits = self._denoiser_logits(rows(x[:, :hi], 0), allowed)[:, lo:hi]
                logits = self._guided(logits, B, W)
                t = float(masked.sum(dim=1).max()) / bs if thr is not None else 1.0 - i / k
                temp = self._temperature(knobs["temperature"], knobs["temperature_schedule"], t)
                x0, commit_BK = self._step(logits, masked, total, i, k, temp, knobs, suppress, generator)
                x[:, lo:hi] = torch.where(commit_BK, x0, x[:, lo:hi])
                committed |= commit_BK
                if knobs["stop_at_eos"]:
                    fill = self._fill_after_eos(x[:, lo:hi], eos, generated)
                    x[:, lo:hi] = x[:, lo:hi].masked_fill(fill, eos)
                    committed &= ~fill
            if eos is not None:
                done |= (x[:, P:hi] == eos).any(dim=1)
                if bool(done.all()):
                    x[:, hi:] = eos
                    break
            if use_cache and hi < end:
                commit(lo, hi)
        return x[:, :total_len]
