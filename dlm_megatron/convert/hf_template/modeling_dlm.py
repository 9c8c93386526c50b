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
(LLaDA's low-confidence remasking). Block-diffusion checkpoints (``config.block_size``)
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
        self.n_heads, self.n_kv_heads, self.head_dim = nh, nkv, d // nh
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
                past: Optional[tuple] = None):
        """x [B, S, d] -> (x, (k, v)): keys/values [B, kv_heads, C + S, head_dim] including the
        ``past`` ones (C cached earlier positions, prepended)."""
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
                output_hidden_states: bool = False, past: Optional[list] = None, kv_out: Optional[list] = None):
        """``past``: per layer (k, v) of earlier positions to attend to (``allowed`` then has
        C + S key columns); ``kv_out``: a list that receives each layer's (k, v), past included."""
        x = self.transformer.wte(input_ids)
        cos, sin = rotary_cos_sin(position_ids, self.config.d_model // self.config.n_heads, self.config.rope_theta)
        hidden = [x] if output_hidden_states else None
        for i, block in enumerate(self.transformer.blocks):
            x, kv = block(x, cos, sin, allowed, None if past is None else past[i])
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
    # Sampling

    def _denoiser_logits(self, tokens: torch.Tensor, allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
        logits = self.forward(tokens, attention_mask=allowed).logits
        if self.config.shift_logits:  # token i is predicted by output i-1
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits[..., : self.config.vocab_size].double()

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
    def _step(logits: torch.Tensor, masked: torch.Tensor, steps_left: int, temperature: float, remasking: str,
              confidence_threshold: Optional[float], suppress: Sequence[int], generator: torch.Generator):
        """One denoising step on a block: candidates [B, K] and which of them to commit [B, K]."""
        logits = logits.index_fill(-1, torch.tensor(list(suppress), device=logits.device), -math.inf)
        if temperature > 0:  # Gumbel-max sampling, float64 noise from a CPU generator
            u = torch.rand(tuple(logits.shape), generator=generator, dtype=torch.float64).to(logits.device)
            gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))
            x0 = (logits / temperature + gumbel).argmax(dim=-1)
        else:
            x0 = logits.argmax(dim=-1)
        probs = F.softmax(logits, dim=-1)
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
        count = masked.sum(dim=1)
        # Linear acceptance profile over the remaining steps: ceil(masked / steps_left).
        n = torch.div(count, steps_left, rounding_mode="floor") + (count % steps_left > 0).long()
        if confidence_threshold is not None:
            n_conf = ((score >= confidence_threshold) & masked).sum(dim=1)
            n = torch.maximum(torch.maximum(n, n_conf), masked.any(dim=1).long())
        score = score.masked_fill(~masked, -math.inf)
        order = score.argsort(dim=-1, descending=True, stable=True)  # ties: leftmost first
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        return x0, (ranks < n[:, None]) & masked

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
        **kwargs,
    ) -> torch.LongTensor:
        """Masked-diffusion generation of ``gen_length`` tokens after ``input_ids`` [B, P]
        (prompts of equal length). Returns [B, P + gen_length].

        steps: denoising steps in total (default gen_length), split evenly over the blocks;
        block_length: semi-autoregressive block length (default: the trained block size of a
        block-diffusion checkpoint, else gen_length); temperature 0 is greedy; remasking:
        which predictions are committed first (low_confidence, margin, entropy, random);
        confidence_threshold: also commit every prediction at least this confident;
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
        k = steps // num_blocks
        eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
        if suppress_token_ids is None:
            suppress_token_ids = [] if cfg.pad_token_id is None else [cfg.pad_token_id]
        suppress = sorted({int(cfg.mask_token_id), *(int(i) for i in suppress_token_ids)})
        generator = torch.Generator().manual_seed(seed)
        opts = dict(remasking=remasking, confidence_threshold=confidence_threshold, suppress=suppress, generator=generator)
        if block_size is not None:
            return self._generate_blocks(input_ids, gen_length, block_size, k, temperature, temperature_schedule, eos, opts,
                                         use_cache=use_cache)

        mask_id, device = cfg.mask_token_id, input_ids.device
        B, P = input_ids.shape
        x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=device)
        x[:, :P] = input_ids
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for b in range(num_blocks):
            lo, hi = P + b * block_length, P + (b + 1) * block_length
            for i in range(k):
                masked = x[:, lo:hi] == mask_id
                if not bool(masked.any()):
                    break
                logits = self._denoiser_logits(x)[:, lo:hi]
                temp = self._temperature(temperature, temperature_schedule, 1.0 - i / k)
                x0, commit = self._step(logits, masked, k - i, temp, **opts)
                x[:, lo:hi] = torch.where(commit, x0, x[:, lo:hi])
            if eos is not None:
                done |= (x[:, P:hi] == eos).any(dim=1)
                tail = x[:, hi:]
                x[:, hi:] = torch.where(done[:, None] & (tail == mask_id), eos, tail)
                if bool(done.all()):
                    break
        return x

    def _cached_logits(self, tokens: torch.Tensor, start: int, past: Optional[list], allowed: Optional[torch.Tensor],
                       kv_out: Optional[list] = None) -> torch.Tensor:
        """Logits of ``tokens`` [B, N] at positions start..start+N-1 after ``past`` (start cached positions)."""
        B, N = tokens.shape
        pos = torch.arange(start, start + N, device=tokens.device).expand(B, N)
        logits, _ = self.model(tokens, allowed, pos, past=past, kv_out=kv_out)
        return logits[..., : self.config.vocab_size].double()

    def _generate_blocks(self, input_ids, gen_length, bs, k, temperature, temperature_schedule, eos, opts, use_cache=True):
        """Block diffusion on the training grid (block j = positions [j*bs, (j+1)*bs))."""
        mask_id, device = self.config.mask_token_id, input_ids.device
        B, P = input_ids.shape
        total = P + gen_length
        first, end = P // bs * bs, -(-total // bs) * bs
        x = torch.full((B, end), mask_id, dtype=torch.long, device=device)
        x[:, :P] = input_ids
        done = torch.zeros(B, dtype=torch.bool, device=device)
        past = None  # per layer (k, v) of x[:, :lo]: finished blocks, block-causal among themselves

        def commit(lo: int, hi: int):
            nonlocal past
            kv: list = []
            self._cached_logits(x[:, lo:hi], lo, past, block_causal_allowed(hi, bs, device)[..., lo:, :], kv)
            past = kv

        if use_cache and first > 0:
            commit(0, first)  # the prompt's whole blocks
        for lo in range(first, end, bs):
            hi = lo + bs
            if eos is not None:
                blk = x[:, lo:hi]
                x[:, lo:hi] = torch.where(done[:, None] & (blk == mask_id), eos, blk)
            allowed = block_causal_allowed(hi, bs, device)
            for i in range(k):
                masked = x[:, lo:hi] == mask_id
                if not bool(masked.any()):
                    break
                if use_cache:  # the block sees every cached position and itself: no mask needed
                    logits = self._cached_logits(x[:, lo:hi], lo, past, None)
                else:
                    logits = self._denoiser_logits(x[:, :hi], allowed)[:, lo:hi]
                temp = self._temperature(temperature, temperature_schedule, 1.0 - i / k)
                x0, commit_BK = self._step(logits, masked, k - i, temp, **opts)
                x[:, lo:hi] = torch.where(commit_BK, x0, x[:, lo:hi])
            if eos is not None:
                done |= (x[:, P:hi] == eos).any(dim=1)
                if bool(done.all()):
                    x[:, hi:] = eos
                    break
            if use_cache and hi < end:
                commit(lo, hi)
        return x[:, :total]
