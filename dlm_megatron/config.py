"""One dataclass tree for every run: YAML presets, dotted overrides, validation.

A run is described by ``Config``; presets live in ``configs/*.yaml`` and any field can be
overridden on the command line as ``section.field=value`` (values are parsed as YAML, so
``train.lr=3e-4``, ``logging.wandb=disabled``, ``diffusion.antithetic=true`` work).

Every field carries a docstring right below it; ``describe()`` reads them back from this
file's source so ``dlm-train --help`` can list every key with its meaning. Errors are
``ConfigError`` (a ValueError) whose message names the offending key and says what is
allowed, so entry points can print it as one line.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

OBJECTIVES = ("masked", "block", "uniform", "hybrid", "continuous", "ar")


class ConfigError(ValueError):
    """A config problem, phrased for the user (one line, names the key)."""


@dataclass(kw_only=True)
class ModelConfig:
    num_layers: int = 4
    """Number of transformer layers."""
    hidden_size: int = 256
    """Model width (residual stream size)."""
    num_attention_heads: int = 4
    """Attention heads; hidden_size must be divisible by it unless model.kv_channels is set."""
    kv_channels: int | None = None
    """Width of one attention head (megatron-core's kv_channels, Hugging Face's head_dim); None =
    hidden_size / num_attention_heads. Set it when heads x head width differs from hidden_size,
    as in Qwen3 and Qwen3-MoE (e.g. Qwen3-30B-A3B: hidden 2048, 32 heads of 128): the query and
    attention-output width is then num_attention_heads * kv_channels, not hidden_size."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; None means one per attention head (MHA)."""
    ffn_hidden_size: int | None = None
    """SwiGLU inner size; None means round(8/3 * hidden_size) up to a multiple of 64."""
    vocab_size: int | None = None
    """Vocabulary size; None takes it from the tokenizer. Padded up for tensor parallelism."""
    make_vocab_size_divisible_by: int = 128
    """Pad the embedding table to a multiple of this (must be divisible by TP) for efficient GEMMs."""
    rotary_base: int = 10000
    """RoPE base frequency (LLaDA-8B uses 500000)."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    init_method_std: float = 0.02
    """Std of the normal init of weight matrices; output projections get std/sqrt(2*num_layers)."""
    tie_embeddings: bool = False
    """Share input embedding and output head weights (LLaDA does not)."""
    add_qkv_bias: bool = False
    """Learned biases on the query/key/value projections (Qwen2 style; tools/convert.py --from-hf sets it for checkpoints that have them). No other linear layer has a bias."""
    transformer_impl: str = "local"
    """Layer implementation: 'local' (pure megatron-core, runs on CPU) or 'transformer_engine' (GPU)."""
    attention_backend: str = "auto"
    """Attention kernel: 'auto' (flex for block diffusion on GPU, sdpa otherwise), 'sdpa' (torch
    scaled_dot_product_attention: flash/cuDNN on GPU, fused on CPU), 'flex' (block-sparse
    FlexAttention, GPU training) or 'dense' (megatron-core's unfused s x s attention). With
    transformer_impl=transformer_engine, TE's own attention runs unless the run needs arbitrary
    masks (block diffusion, diffusion.anneal_steps > 0, data.document_masks): those use this kernel."""
    recompute: str = "none"
    """Activation recomputation: 'none', 'selective' (core attention only) or 'full' (whole layers)."""
    qk_layernorm: bool = False
    """Per-head RMSNorm on queries and keys before RoPE (megatron-core's qk_layernorm; Qwen3 and
    LLaDA-MoE have it)."""
    num_moe_experts: int | None = None
    """Mixture of experts: routed experts per MoE layer (megatron-core's num_moe_experts); None = dense
    SwiGLU MLP in every layer. Built through megatron-core's MoE layer spec (router, token
    dispatcher, SequentialMLP experts)."""
    moe_router_topk: int = 2
    """Experts each token is routed to (top-k)."""
    moe_ffn_hidden_size: int | None = None
    """SwiGLU inner size of each routed expert; None = model.ffn_hidden_size (after its default)."""
    moe_shared_expert_intermediate_size: int = 0
    """Inner size of an always-on shared expert (DeepSeek / LLaDA 2.0 style); 0 = none (megatron-core's None)."""
    moe_layer_freq: int = 1
    """Every moe_layer_freq-th layer (counting from layer 0, after the dense first layers) is MoE; the others are dense."""
    moe_first_k_dense: int = 0
    """The first k layers are dense MLP layers (DeepSeek-V3 / LLaDA 2.0 first_k_dense_replace)."""
    moe_aux_loss_coeff: float = 0.0
    """Coefficient of the Switch-style load-balancing loss (per micro-batch, megatron-core's 'aux_loss'),
    added to the diffusion loss through its gradient; 0 = none (e.g. aux-free expert bias)."""
    moe_router_score_function: str = "softmax"
    """Router scores: 'softmax' (Mixtral / LLaDA-MoE) or 'sigmoid' (DeepSeek-V3 / LLaDA 2.0)."""
    moe_router_pre_softmax: bool = False
    """Softmax over all experts before top-k, without renormalising the k kept probabilities
    (LLaDA-MoE, Qwen-MoE with norm_topk_prob=false); false renormalises the top-k (megatron's default)."""
    moe_router_enable_expert_bias: bool = False
    """Aux-loss-free balancing: a per-expert bias added to the scores for top-k selection only,
    updated after each step by moe_router_bias_update_rate * sign(mean load - load) (DeepSeek-V3;
    sigmoid scores; megatron engine)."""
    moe_router_bias_update_rate: float = 1e-3
    """Step size of the expert-bias update (model.moe_router_enable_expert_bias)."""


@dataclass(kw_only=True)
class DiffusionConfig:
    objective: str = "masked"
    """Training objective: masked | block | uniform | hybrid | continuous | ar."""
    eps: float = 1e-3
    """Lower bound of the noise level: t ~ U(eps, 1) so the 1/t weight stays finite."""
    antithetic: bool = False
    """Draw the batch's t values as a stratified (low-discrepancy) set instead of i.i.d."""
    random_length_prob: float = 0.01
    """Probability that a batch is cut to a random length in [1, seq_len] (LLaDA: 1%)."""
    block_size: int = 16
    """Block length B of block diffusion; must divide data.seq_len."""
    t_min: float = 0.0
    """Block diffusion: lower end of a clipped noise schedule t ~ U[t_min, t_max] (BD3-LM beta); 0 = eps."""
    t_max: float = 1.0
    """Block diffusion: upper end of the clipped noise schedule (BD3-LM omega)."""
    p_uniform: float = 0.1
    """Hybrid noise: probability that a corrupted token becomes a uniformly random token instead of MASK (0 < p <= 1)."""
    anneal_steps: int = 0
    """AR->diffusion adaptation (DiffuLLaMA): anneal attention from causal to full over this many steps (at step s each future key is visible with prob. s/anneal_steps, drawn per step); 0 = off. Use with train.init_from=AR_RUN."""
    shift_logits: bool = False
    """Masked diffusion: predict token i from position i-1's output (DiffuLLaMA/Dream shift, keeps an AR model's next-token head); token 0 is never masked."""
    sigma_min: float = 1.0
    """Continuous (CDCD): smallest noise std sigma of the log-uniform training schedule and the sampler's last level."""
    sigma_max: float = 300.0
    """Continuous (CDCD): largest noise std sigma (training schedule and sampler start); embeddings have norm sqrt(hidden_size)."""
    time_embed_features: int = 64
    """Continuous: number of Fourier features of log(sigma) fed to the learned time embedding (must be even)."""
    prompt_dropout: float = 0.0
    """SFT (data.sft_path): probability that a training example has its whole prompt masked, so the model also learns the unconditional p(response) that classifier-free guidance (generate --cfg-scale) subtracts; validation never drops. 0 = off."""


@dataclass(kw_only=True)
class DataConfig:
    train_path: str = "builtin:shakespeare/train"
    """Training shards: a directory written by tools/shard.py, builtin:shakespeare/train, or a
    weighted blend "0.7:dirA,0.3:dirB" (relative weights; see docs/data.md)."""
    val_path: str | None = "builtin:shakespeare/val"
    """Validation shards (same forms as train_path); null disables validation."""
    tokenizer: str = "builtin"
    """Tokenizer file (HF tokenizer.json or a *.tiktoken BPE ranks file); 'builtin' is the
    shipped 8k Shakespeare BPE."""
    seq_len: int = 128
    """Training sequence length in tokens."""
    cache_dir: str = ".cache/data"
    """Where builtin corpora are tokenized to and where the index cache (document offsets,
    sample and blend indices, built once per dataset + config) lives, relative to the working
    directory. Multi-node runs need it on a filesystem every node sees (docs/data.md)."""
    prefetch: int = 2
    """Steps of batches read and noised ahead in a background thread while the current step
    runs (0: in the training loop). Batches depend only on the step, so resume is unchanged."""
    document_masks: bool = False
    """Block attention across <|endoftext|> boundaries inside a packed sequence (needs an
    arbitrary-mask attention; see docs/data.md)."""
    sft_path: str | None = None
    """SFT / conditional training: a JSONL of {"prompt","response"} or {"messages":[...]}; when set,
    training uses these examples (prompt never noised, loss on the response only; masked objective)."""
    sft_val_path: str | None = None
    """SFT validation JSONL (same format); used instead of val_path when sft_path is set (null: no validation)."""
    chat_template: str = "<|{role}|>\n{content}\n"
    """SFT: format string rendering each {"role","content"} message of a "messages" example."""
    sft_padding: str = "batch"
    """SFT: 'batch' pads each global batch with EOT to its longest example rounded up to a multiple
    of 8 (at most seq_len; one length for every rank and micro-batch of the step), 'seq_len' pads
    every example to data.seq_len. The EOT padding is part of the response either way (LLaDA)."""


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 200
    """Number of optimizer steps."""
    global_batch_size: int = 16
    """Sequences per optimizer step, summed over data-parallel ranks and accumulation."""
    micro_batch_size: int = 8
    """Sequences per forward pass on one rank; accumulation = global / (micro * dp)."""
    seed: int = 1234
    """Seed of weights, data order and noise (runs are identical for any parallel layout)."""
    output_dir: str = "runs/tiny"
    """Run directory: metrics.jsonl, config.yaml, checkpoints/, wandb/."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr: float = 3e-4
    """Final learning rate of the decay phase."""
    lr_schedule: str = "cosine"
    """'cosine' (warmup then cosine decay), 'wsd' (warmup, stable, decay) or 'constant'."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    decay_fraction: float = 0.2
    """WSD only: fraction of the steps spent in the final linear decay."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norms and biases)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    precision: str = "auto"
    """'auto' (bf16 on GPU, fp32 on CPU), 'bf16' or 'fp32'."""
    save_interval: int = 50
    """Save a checkpoint every N steps (and at the end); 0 saves only at the end."""
    async_save: bool = True
    """Write checkpoints in a background thread while training continues (the step that saves
    only copies state to host memory); false writes them before the next step."""
    keep_last: int = 3
    """Keep this many most recent checkpoints; older ones are deleted after a successful save."""
    eval_interval: int = 50
    """Run validation every N steps (and at the end); 0 disables periodic validation."""
    eval_batches: int = 4
    """Validation batches (of global_batch_size sequences) per evaluation, drawn with a fixed seed."""
    max_bad_steps: int = 5
    """Non-finite steps (a non-finite loss or gradient) in a row tolerated, each skipped with a warning, before the run stops."""
    sample_at_end: bool = True
    """Print a generated sample (generate.* settings) when training finishes."""
    save_at_end: bool = True
    """Save a checkpoint when training finishes (benchmarks turn it off)."""
    init_from: str | None = None
    """Start from these weights (a run directory or checkpoint folder of any layout, e.g. an
    imported HF model) at step 0 with a fresh optimizer; ignored once the run has its own checkpoint."""


@dataclass(kw_only=True)
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 over the data-parallel ranks (0 = plain data parallel)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism: norms, residuals and dropout hold seq_len/tp positions per TP
    rank (TP>1, megatron engine only; local spec or transformer_engine). Under it, LLaDA's random
    length (diffusion.random_length_prob) is rounded up to a multiple of parallel.tp."""
    engine: str = "auto"
    """Training engine: 'auto' (megatron-core DDP + distributed optimizer for pp>1, ep>1,
    sequence_parallel or model.qk_layernorm at tp>1, DeepSpeed otherwise), 'deepspeed' (ZeRO 0-3, pp=1 and ep=1 only) or 'megatron' (zero_stage 0 or 1, any pp/ep)."""
    ep: int = 1
    """Expert-parallel size (MoE): the routed experts of each layer are split over ep ranks taken
    from the data-parallel ranks (needs the megatron engine for ep > 1; ep must divide
    model.num_moe_experts and the data-parallel size)."""


@dataclass(kw_only=True)
class LoggingConfig:
    wandb: str = "offline"
    """Weights & Biases mode: offline (files under output_dir/wandb), online, or disabled."""
    wandb_project: str = "dlm_megatron"
    """W&B project name."""
    wandb_run_name: str | None = None
    """W&B run name; None uses the output directory name."""
    log_interval: int = 1
    """Log a step line and a metrics.jsonl row every N steps."""


@dataclass(kw_only=True)
class GenerateConfig:
    prompt: str = "ROMEO:"
    """Prompt of the sample printed at the end of training."""
    gen_length: int = 64
    """Tokens to generate."""
    steps: int = 64
    """Denoising steps in total."""
    block_length: int = 32
    """Semi-autoregressive block length (divides gen_length)."""
    temperature: float = 0.0
    """Sampling temperature T0; 0 is greedy."""
    temperature_schedule: str = "constant"
    """Temperature at noise level t: constant T0, linear T0 * t, cosine T0 * (1 - cos(pi t)) / 2."""
    remasking: str = "low_confidence"
    """Which predictions to commit first: low_confidence, random, margin or entropy."""
    acceptance_profile: str = "linear"
    """Fraction of a block's masked positions committed after step n of K: linear n/K (LLaDA) or cosine 1 - cos(pi/2 n/K) (MaskGIT)."""
    renoise_profile: str = "none"
    """ReMDM remasking of committed tokens per step: none, constant (eta), cap (min(eta, (1-a_s)/a_t)), rescale (eta * min(1, (1-a_s)/a_t)) or loop (eta for t_off < t <= t_on)."""
    renoise_eta: float = 0.02
    """eta of generate.renoise_profile (constant/loop: per-step probability; cap: the cap; rescale: the factor)."""
    renoise_t_on: float = 0.55
    """renoise_profile=loop: noise level where the remasking loop starts (ReMDM t_on)."""
    renoise_t_off: float = 0.05
    """renoise_profile=loop: noise level where the remasking loop ends (ReMDM t_off)."""
    renoise_alpha_on: float = 0.9
    """renoise_profile=loop: committed fraction reached at t_on and held during the loop (ReMDM alpha_on)."""
    renoise_prob: float = 0.0
    """Alias: p > 0 means renoise_profile=constant with renoise_eta=p."""
    confidence_threshold: float | None = None
    """Also commit every position at least this confident, within the step schedule (null: off)."""
    parallel_threshold: float | None = None
    """Fast-dLLM: commit every position at least this confident and at least one, ignoring the step schedule (null: off)."""
    cache: str = "none"
    """Fast-dLLM KV cache for masked checkpoints, refreshed when a block starts: none, prefix or dual."""
    cfg_scale: float = 0.0
    """Classifier-free guidance W: logits = u + (1 + W)(c - u), u with the prompt masked; 0 = off."""
    stop_at_eos: bool = False
    """A committed EOS also fills the rest of its block with EOS (changes tokens; fewer steps)."""
    seed: int = 0
    """Sampling seed."""


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """Training objective and noise process."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus, tokenizer and sequence length."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, schedule, checkpoints and evaluation."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging sinks."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """Defaults of the sampler."""


# ---------------------------------------------------------------------------------------
# YAML and overrides


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check/convert a YAML-parsed value against a field annotation."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads "1e-2" as a string; accept the usual float spellings.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _apply_dict(obj: Any, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    types = _field_types(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (valid here: {', '.join(sorted(names))})")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            _apply_dict(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(v, types[k], key))


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', yaml-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_override(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    obj: Any = cfg
    for i, p in enumerate(parts[:-1]):
        if not dataclasses.is_dataclass(obj) or p not in {f.name for f in dataclasses.fields(obj)}:
            raise ConfigError(f"unknown config key '{key}' (no section '{'.'.join(parts[:i+1])}')")
        obj = getattr(obj, p)
    leaf = parts[-1]
    if not dataclasses.is_dataclass(obj) or leaf not in {f.name for f in dataclasses.fields(obj)}:
        import difflib

        names = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
        close = difflib.get_close_matches(leaf, names, n=1)
        hint = f"; did you mean '{'.'.join(parts[:-1] + close)}'?" if close else " (run with --help for all keys)"
        raise ConfigError(f"unknown config key '{key}'{hint}")
    if dataclasses.is_dataclass(getattr(obj, leaf)):
        raise ConfigError(f"'{key}' is a section; set one of its fields, e.g. {key}.<field>=...")
    setattr(obj, leaf, _coerce(value, _field_types(type(obj))[leaf], key))


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML preset (or defaults if ``path`` is None), apply overrides, validate."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' not found (presets are in configs/, e.g. configs/tiny.yaml)")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file '{path}' is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
        _apply_dict(cfg, data)
    for ov in overrides:
        k, v = parse_override(ov)
        apply_override(cfg, k, v)
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    cfg = Config()
    _apply_dict(cfg, data)
    validate(cfg)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------
# Validation (cross-field; world-size dependent checks live in parallel/)


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: Config) -> None:
    m, d, da, t, p = cfg.model, cfg.diffusion, cfg.data, cfg.train, cfg.parallel
    for k in ("num_layers", "hidden_size", "num_attention_heads", "make_vocab_size_divisible_by"):
        _positive(f"model.{k}", getattr(m, k))
    if m.kv_channels is not None:
        _positive("model.kv_channels", m.kv_channels)
    elif m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads}; set model.kv_channels to the head width")
    if m.num_query_groups is not None and m.num_attention_heads % m.num_query_groups:
        raise ConfigError(f"model.num_attention_heads={m.num_attention_heads} is not divisible by model.num_query_groups={m.num_query_groups}")
    _choice("model.transformer_impl", m.transformer_impl, ("local", "transformer_engine"))
    _choice("model.attention_backend", m.attention_backend, ("auto", "dense", "sdpa", "flex"))
    _choice("model.recompute", m.recompute, ("none", "selective", "full"))
    _choice("diffusion.objective", d.objective, OBJECTIVES)
    if not 0 < d.eps < 1:
        raise ConfigError(f"diffusion.eps must be in (0, 1), got {d.eps}")
    if not 0 <= d.random_length_prob <= 1:
        raise ConfigError(f"diffusion.random_length_prob must be in [0, 1], got {d.random_length_prob}")
    if not 0 <= d.t_min < d.t_max <= 1:
        raise ConfigError(f"diffusion.t_min/t_max must satisfy 0 <= t_min < t_max <= 1, got {d.t_min}, {d.t_max}")
    _positive("diffusion.anneal_steps", d.anneal_steps, allow_zero=True)
    if not 0 < d.sigma_min < d.sigma_max:
        raise ConfigError(f"diffusion.sigma_min/sigma_max must satisfy 0 < sigma_min < sigma_max, got {d.sigma_min}, {d.sigma_max}")
    if d.time_embed_features <= 0 or d.time_embed_features % 2:
        raise ConfigError(f"diffusion.time_embed_features must be a positive even number, got {d.time_embed_features}")
    if (d.anneal_steps or d.shift_logits) and d.objective != "masked":
        raise ConfigError(f"diffusion.anneal_steps/shift_logits apply to diffusion.objective=masked only, not {d.objective!r}")
    if d.objective == "continuous" and p.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel is not supported with diffusion.objective=continuous yet")
    _choice("data.sft_padding", da.sft_padding, ("batch", "seq_len"))
    if da.sft_path is not None and d.objective != "masked":
        raise ConfigError(f"data.sft_path (SFT) trains the masked objective only, got diffusion.objective={d.objective}")
    if not 0 <= d.prompt_dropout < 1:
        raise ConfigError(f"diffusion.prompt_dropout must be in [0, 1), got {d.prompt_dropout}")
    if d.prompt_dropout > 0 and da.sft_path is None:
        raise ConfigError("diffusion.prompt_dropout masks SFT prompts: set data.sft_path too, or diffusion.prompt_dropout=0")
    if da.sft_path is not None and d.anneal_steps:
        raise ConfigError("diffusion.anneal_steps (causal -> full attention) is for adaptation pretraining, not SFT: "
                          "fine-tune the adapted checkpoint with diffusion.anneal_steps=0 (shift_logits carries over)")
    if not 0 < d.p_uniform <= 1:
        raise ConfigError(f"diffusion.p_uniform must be in (0, 1], got {d.p_uniform}")
    _positive("data.seq_len", da.seq_len)
    _positive("diffusion.block_size", d.block_size)
    if d.objective == "block" and da.seq_len % d.block_size:
        raise ConfigError(f"diffusion.block_size={d.block_size} must divide data.seq_len={da.seq_len}")
    for k in ("steps", "global_batch_size", "micro_batch_size", "lr"):
        _positive(f"train.{k}", getattr(t, k))
    for k in ("min_lr", "warmup_steps", "grad_clip", "save_interval", "eval_interval", "weight_decay"):
        _positive(f"train.{k}", getattr(t, k), allow_zero=True)
    _positive("train.keep_last", t.keep_last)
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size={t.micro_batch_size}")
    _choice("train.lr_schedule", t.lr_schedule, ("cosine", "wsd", "constant"))
    _choice("train.precision", t.precision, ("auto", "bf16", "fp32"))
    if not 0 <= t.decay_fraction <= 1:
        raise ConfigError(f"train.decay_fraction must be in [0, 1], got {t.decay_fraction}")
    _positive("parallel.tp", p.tp)
    _positive("parallel.pp", p.pp)
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}")
    _choice("parallel.engine", p.engine, ("auto", "deepspeed", "megatron"))
    validate_layout(cfg)
    if m.num_layers % p.pp:
        raise ConfigError(f"model.num_layers={m.num_layers} is not divisible by parallel.pp={p.pp}")
    if m.num_attention_heads % p.tp:
        raise ConfigError(f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tp={p.tp}")
    if (m.num_query_groups or m.num_attention_heads) % p.tp:
        raise ConfigError(f"model.num_query_groups={m.num_query_groups} is not divisible by parallel.tp={p.tp}")
    if da.document_masks and d.objective in ("block", "continuous"):
        raise ConfigError(f"data.document_masks is not supported with diffusion.objective={d.objective} "
                          f"(its attention layout has its own mask); set data.document_masks=false")
    _choice("logging.wandb", cfg.logging.wandb, ("offline", "online", "disabled"))
    _positive("logging.log_interval", cfg.logging.log_interval)
    g = cfg.generate
    _choice("generate.remasking", g.remasking, ("low_confidence", "random", "margin", "entropy"))
    _choice("generate.temperature_schedule", g.temperature_schedule, ("constant", "linear", "cosine"))
    _choice("generate.acceptance_profile", g.acceptance_profile, ("linear", "cosine"))
    _choice("generate.renoise_profile", g.renoise_profile, ("none", "constant", "cap", "rescale", "loop"))
    _choice("generate.cache", g.cache, ("none", "prefix", "dual"))
    if g.gen_length % g.block_length:
        raise ConfigError(f"generate.block_length={g.block_length} must divide generate.gen_length={g.gen_length}")
    if g.steps % (g.gen_length // g.block_length):
        raise ConfigError(f"generate.steps={g.steps} must be a multiple of the number of blocks ({g.gen_length // g.block_length})")
    from .sampling.masked import SamplerConfig  # the sampler's own range checks, phrased with the key

    try:
        SamplerConfig(**{f.name: getattr(g, f.name) for f in dataclasses.fields(SamplerConfig) if hasattr(g, f.name)})
    except ValueError as e:
        raise ConfigError(f"generate.{e}") from None


def resolved_engine(p: ParallelConfig, m: ModelConfig | None = None) -> str:
    """``parallel.engine`` with 'auto' resolved: megatron-core's for pp > 1, ep > 1 (DeepSpeed
    cannot reduce expert gradients over expert-data-parallel groups), sequence parallelism or
    per-head q/k norms at tp > 1 (DeepSpeed does not sum the replicated norms' partial
    gradients over TP: ``qk_norm_needs_tp_sum``), DeepSpeed otherwise."""
    if p.engine != "auto":
        return p.engine
    megatron = p.pp > 1 or p.ep > 1 or p.sequence_parallel or (m is not None and qk_norm_needs_tp_sum(p, m))
    return "megatron" if megatron else "deepspeed"


def qk_norm_needs_tp_sum(p: ParallelConfig, m: ModelConfig) -> bool:
    """Per-head q/k norms (model.qk_layernorm) at tp > 1: each TP rank normalises only its own
    heads, so its gradient of the shared norm weight is a partial sum, and the full gradient is
    the sum over the TP group. megatron's finalize step sums it (the megatron engine);
    DeepSpeed does not, and its TP ranks' copies would drift apart (measured: 0.04 after 4
    steps of tiny at tp=2)."""
    return m.qk_layernorm and p.tp > 1


def validate_layout(cfg: Config) -> None:
    """Refuse parallel layouts that no test proves (each refusal says what to change).

    Proven (tests/distributed, tests/gpu): DeepSpeed ZeRO 0-3 at pp=1 with any tp/dp; the
    megatron engine (zero 0/1) at any tp/pp/dp; sequence parallel only with the local spec on
    the megatron engine, whose finalize step all-reduces the replicated norm gradients over TP
    (DeepSpeed does not, so its norms would silently drift apart; no test has run it with
    Transformer Engine)."""
    p, m, d = cfg.parallel, cfg.model, cfg.diffusion
    eng = resolved_engine(p, m)
    if eng == "deepspeed" and p.pp > 1:
        raise ConfigError(f"parallel.engine=deepspeed does not run pipeline layouts (parallel.pp={p.pp}); "
                          f"use parallel.engine=megatron or auto")
    if eng == "megatron" and p.zero_stage not in (0, 1):
        why = "" if p.engine == "megatron" else " (auto picks it for this layout)"
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} is not supported by the megatron engine{why}: "
                          f"it shards optimizer states with megatron-core's distributed optimizer (ZeRO-1 equivalent); "
                          f"set parallel.zero_stage=1")
    if eng == "deepspeed" and qk_norm_needs_tp_sum(p, m):
        raise ConfigError(f"model.qk_layernorm=true at parallel.tp={p.tp} needs parallel.engine=megatron (or auto): DeepSpeed "
                          f"does not sum the q/k norm gradients over tensor-parallel ranks, each of which holds only its heads' share")
    if p.sequence_parallel:
        if p.tp < 2:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tp >= 2")
        if eng != "megatron":
            raise ConfigError("parallel.sequence_parallel=true needs parallel.engine=megatron: DeepSpeed does not "
                              "all-reduce the norm gradients over tensor-parallel ranks under sequence parallelism")
        if m.transformer_impl == "transformer_engine":
            raise ConfigError("parallel.sequence_parallel=true is proven only on the local spec, not with Transformer "
                              "Engine (no test has run it); set model.transformer_impl=local")
        if cfg.data.seq_len % p.tp:
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} must be divisible by parallel.tp={p.tp} with "
                              f"parallel.sequence_parallel=true (each TP rank holds seq_len/tp positions)")
    validate_moe(cfg)
    if d.objective == "continuous" and p.pp > 1:
        raise ConfigError(f"diffusion.objective=continuous is not proven with pipeline parallelism (parallel.pp={p.pp}): "
                          f"its noisy embeddings enter the first stage as decoder input; use parallel.pp=1 (TP and DP work)")


def validate_moe(cfg: Config) -> None:
    """MoE settings and the layouts MoE is proven at (tests/distributed/test_moe.py): ep 1 on
    any engine (DeepSpeed ZeRO 0-3 at DP2), ep > 1 and pp > 1 (PP2 x EP2 too) on the megatron
    engine (zero_stage 0/1), tp > 1 with sequence parallelism (megatron engine; experts split
    over TP as megatron's expert TP = tp); every discrete objective at EP2."""
    m, p = cfg.model, cfg.parallel
    _positive("parallel.ep", p.ep)
    if m.num_moe_experts is None:
        if p.ep > 1:
            raise ConfigError(f"parallel.ep={p.ep} needs a mixture-of-experts model; set model.num_moe_experts")
        return
    _choice("model.moe_router_score_function", m.moe_router_score_function, ("softmax", "sigmoid"))
    if m.num_moe_experts < 2:
        raise ConfigError(f"model.num_moe_experts must be >= 2, got {m.num_moe_experts}")
    if not 1 <= m.moe_router_topk <= m.num_moe_experts:
        raise ConfigError(f"model.moe_router_topk={m.moe_router_topk} must be in [1, model.num_moe_experts={m.num_moe_experts}]")
    for k in ("moe_layer_freq",):
        _positive(f"model.{k}", getattr(m, k))
    for k in ("moe_shared_expert_intermediate_size", "moe_first_k_dense", "moe_aux_loss_coeff", "moe_router_bias_update_rate"):
        _positive(f"model.{k}", getattr(m, k), allow_zero=True)
    if m.moe_ffn_hidden_size is not None:
        _positive("model.moe_ffn_hidden_size", m.moe_ffn_hidden_size)
    if 1 not in moe_layer_pattern(m):
        raise ConfigError(f"model.moe_first_k_dense={m.moe_first_k_dense} leaves no MoE layer among model.num_layers={m.num_layers}")
    if m.num_moe_experts % p.ep:
        raise ConfigError(f"model.num_moe_experts={m.num_moe_experts} is not divisible by parallel.ep={p.ep}")
    eng = resolved_engine(p, m)
    if p.ep > 1 and eng != "megatron":
        raise ConfigError(f"parallel.ep={p.ep} needs parallel.engine=megatron (or auto): DeepSpeed cannot reduce expert "
                          f"gradients over expert-data-parallel groups")
    if m.moe_router_enable_expert_bias and eng != "megatron":
        raise ConfigError("model.moe_router_enable_expert_bias=true needs parallel.engine=megatron (its finalize step "
                          "updates the bias from the global batch's expert loads)")
    if p.tp > 1 and not p.sequence_parallel:
        raise ConfigError(f"parallel.tp={p.tp} with model.num_moe_experts needs sequence parallelism (megatron-core's MoE "
                          f"layer refuses TP without it in training): set parallel.sequence_parallel=true"
                          + ("" if eng == "megatron" else " parallel.engine=megatron (sequence parallelism is megatron-engine only)"))
    if cfg.diffusion.objective == "continuous":
        raise ConfigError("diffusion.objective=continuous is not proven with model.num_moe_experts; use a dense model "
                          "or a discrete objective (masked, block, ar, uniform, hybrid)")


def moe_layer_pattern(m: ModelConfig) -> list[int]:
    """1 for each MoE layer, 0 for each dense one (megatron-core's list form of moe_layer_freq)."""
    if m.num_moe_experts is None:
        return []
    k = m.moe_first_k_dense
    return [int(i >= k and (i - k) % m.moe_layer_freq == 0) for i in range(m.num_layers)] if k < m.num_layers else []


def head_dim(m: ModelConfig) -> int:
    """Width of one attention head: model.kv_channels, else hidden_size / num_attention_heads."""
    return m.kv_channels if m.kv_channels is not None else m.hidden_size // m.num_attention_heads


def moe_ffn_size(m: ModelConfig) -> int:
    return m.moe_ffn_hidden_size if m.moe_ffn_hidden_size is not None else ffn_size(m)


def ffn_size(m: ModelConfig) -> int:
    if m.ffn_hidden_size is not None:
        return m.ffn_hidden_size
    return ((int(8 * m.hidden_size / 3) + 63) // 64) * 64


def padded_vocab_size(vocab_size: int, m: ModelConfig, tp: int = 1) -> int:
    """Embedding rows: vocab padded to make_vocab_size_divisible_by.

    Deliberately independent of TP (unlike Megatron-LM, which pads to a multiple of
    divisible_by * tp) so that every layout has the same weights and the same loss.
    """
    mult = m.make_vocab_size_divisible_by
    padded = ((vocab_size + mult - 1) // mult) * mult
    if padded % tp:
        raise ConfigError(f"padded vocabulary {padded} is not divisible by parallel.tp={tp}; set model.make_vocab_size_divisible_by to a multiple of {tp}")
    return padded


# ---------------------------------------------------------------------------------------
# Self-documentation


def _field_docs(cls) -> dict[str, str]:
    """Read the docstring under each field from the class source."""
    src = inspect.getsource(cls)
    tree = ast.parse(src)
    body = tree.body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(getattr(b, "value", None), ast.Constant):
            docs[a.target.id] = str(b.value.value)
    return docs


def describe() -> str:
    """All config keys with default and docstring, for --help."""
    lines = []
    root = Config()
    for sec in dataclasses.fields(root):
        obj = getattr(root, sec.name)
        docs = _field_docs(type(obj))
        lines.append(f"{sec.name}:")
        for f in dataclasses.fields(obj):
            lines.append(f"  {sec.name}.{f.name} = {getattr(obj, f.name)!r}\n      {docs.get(f.name, '')}")
    return "\n".join(lines)
