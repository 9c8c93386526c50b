"""Mixture of experts: config fields and refusals, megatron-core's MoE layer spec as built, the
canonical names of experts, and the router's aux loss in the gradient with its coefficient."""
import pytest
import torch

from common import REPO

V = 512
SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
         "model.moe_ffn_hidden_size=64", "data.seq_len=32", "logging.wandb=disabled"]


def cfg_of(*extra, path="configs/tiny_moe.yaml"):
    from dlm_megatron.config import load_config

    return load_config(path, [*SMALL, *extra])


def test_moe_fields_have_docstrings():
    from dlm_megatron.config import describe

    text = describe()
    for key in ("model.num_moe_experts", "model.moe_router_topk", "model.moe_ffn_hidden_size",
                "model.moe_shared_expert_intermediate_size", "model.moe_layer_freq", "model.moe_first_k_dense",
                "model.moe_aux_loss_coeff", "model.moe_router_score_function", "model.moe_router_pre_softmax",
                "model.moe_router_enable_expert_bias", "model.qk_layernorm", "parallel.ep"):
        line = text.split(f"  {key} = ")[1].split("\n")
        assert len(line[1].strip()) > 20, key


@pytest.mark.parametrize("overrides,match", [
    (["parallel.ep=3"], "model.num_moe_experts=8 is not divisible by parallel.ep=3"),
    (["parallel.ep=2", "parallel.engine=deepspeed"], "parallel.ep=2 needs parallel.engine=megatron"),
    (["parallel.tp=2", "parallel.engine=megatron"], "parallel.tp=2 with model.num_moe_experts needs sequence parallelism .*: "
                                                    "set parallel.sequence_parallel=true$"),
    (["parallel.tp=2"], "parallel.tp=2 with model.num_moe_experts needs sequence parallelism .*: "
                        "set parallel.sequence_parallel=true$"),  # auto: megatron (q/k norms at tp 2)
    (["parallel.tp=2", "model.qk_layernorm=false", "parallel.engine=deepspeed"],
     "set parallel.sequence_parallel=true parallel.engine=megatron "),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.engine=deepspeed"],
     "model.qk_layernorm=true at parallel.tp=2 needs parallel.engine=megatron"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "model.qk_layernorm=false", "parallel.engine=deepspeed"],
     "parallel.sequence_parallel=true needs parallel.engine=megatron"),
    (["model.moe_router_topk=9"], "model.moe_router_topk=9 must be in"),
    (["model.moe_router_score_function=relu"], "model.moe_router_score_function='relu' is not one of"),
    (["model.moe_first_k_dense=2"], "leaves no MoE layer"),
    (["model.moe_router_enable_expert_bias=true"], "needs parallel.engine=megatron"),
    (["diffusion.objective=continuous"], "continuous is not proven with model.num_moe_experts"),
    (["model.num_moe_experts=null", "parallel.ep=2"], "parallel.ep=2 needs a mixture-of-experts model"),
])
def test_bad_moe_settings_are_one_line_errors(overrides, match):
    from dlm_megatron.config import ConfigError

    with pytest.raises(ConfigError, match=match) as e:
        cfg_of(*overrides)
    assert "\n" not in str(e.value)


def test_tp2_with_sequence_parallel_is_accepted_on_the_megatron_engine():
    from dlm_megatron.config import resolved_engine

    cfg = cfg_of("parallel.tp=2", "parallel.sequence_parallel=true", "parallel.engine=megatron", "parallel.zero_stage=1")
    assert cfg.parallel.tp == 2 and cfg.parallel.sequence_parallel
    auto = cfg_of("parallel.tp=2", "parallel.sequence_parallel=true")  # auto picks the engine that can run it
    assert resolved_engine(auto.parallel, auto.model) == "megatron"


def test_ep_resolves_to_the_megatron_engine():
    from dlm_megatron.config import resolved_engine

    assert resolved_engine(cfg_of("parallel.ep=2").parallel) == "megatron"
    assert resolved_engine(cfg_of().parallel) == "deepspeed"


def test_layer_pattern():
    from dlm_megatron.config import moe_layer_pattern

    assert moe_layer_pattern(cfg_of("model.num_layers=6", "model.moe_first_k_dense=1", "model.moe_layer_freq=2").model) == [0, 1, 0, 1, 0, 1]
    assert moe_layer_pattern(cfg_of("model.num_layers=3").model) == [1, 1, 1]


def test_transformer_config_uses_megatron_names_and_none_for_no_shared_expert():
    from dlm_megatron.model.denoiser import transformer_config

    t = transformer_config(cfg_of())
    assert (t.num_moe_experts, t.moe_router_topk, t.moe_ffn_hidden_size) == (8, 2, 64)
    assert t.moe_shared_expert_intermediate_size is None  # 0 in our config: megatron wants None
    assert t.moe_router_pre_softmax and t.qk_layernorm and t.moe_aux_loss_coeff == 1e-2
    assert t.moe_token_dispatcher_type == "allgather"  # CPU: the all-to-all dispatcher needs a CUDA stream
    assert transformer_config(cfg_of("model.moe_shared_expert_intermediate_size=32")).moe_shared_expert_intermediate_size == 32


def test_expert_names_are_canonical_whatever_the_implementation():
    from dlm_megatron.model import sharding

    seq = "decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight"
    grouped = "decoder.layers.1.mlp.experts.linear_fc1.weight1"
    want = "decoder.layers.1.mlp.experts.local_experts.5.linear_fc1.weight"
    assert sharding.canonical_name(seq, 0, expert_offset=4) == want
    assert sharding.canonical_name(grouped, 0, expert_offset=4) == want
    assert sharding.canonical_name("decoder.layers.0.mlp.experts.linear_fc2.weight0", 1) == \
        "decoder.layers.1.mlp.experts.local_experts.0.linear_fc2.weight"
    assert sharding.is_expert(want) and not sharding.is_expert("decoder.layers.1.mlp.router.weight")
    assert sharding.canonical_name("decoder.layers.0.mlp.router.weight", 2, expert_offset=4) == "decoder.layers.2.mlp.router.weight"


@pytest.fixture(scope="module")
def make():
    from dlm_megatron.model.denoiser import build_model, init_weights
    from dlm_megatron.parallel import dist as pdist
    from dlm_megatron.train import quiet_warnings

    quiet_warnings()
    pdist.init_distributed(cfg_of())

    def build(*extra):
        cfg = cfg_of(*extra)
        model = build_model(cfg, V, pre_process=True, post_process=True)
        init_weights(model, cfg, tp_rank=0, pp_rank=0)
        return model, cfg

    return build


def test_built_from_megatron_moe_spec(make):
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher

    model, _ = make("model.num_layers=3", "model.moe_first_k_dense=1")
    layers = model.decoder.layers
    assert isinstance(layers[0].mlp, MLP) and not isinstance(layers[0].mlp, MoELayer)
    for layer in layers[1:]:
        assert isinstance(layer.mlp, MoELayer) and isinstance(layer.mlp.router, TopKRouter)
        assert isinstance(layer.mlp.experts, SequentialMLP) and len(layer.mlp.experts.local_experts) == 8
        assert isinstance(layer.mlp.token_dispatcher, MoEAllGatherTokenDispatcher) and layer.mlp.shared_experts is None
    assert type(layers[0].self_attention.q_layernorm).__name__ != "IdentityOp"
    names = {n for n, _ in model.named_parameters()}
    assert "decoder.layers.2.mlp.experts.local_experts.7.linear_fc2.weight" in names


def _router_grad(model, cfg, scale=1.0):
    from dlm_megatron.diffusion.masked import weighted_token_loss
    from dlm_megatron.diffusion.objectives import build_objective
    from dlm_megatron.model.moe import set_aux_loss_scale

    set_aux_loss_scale(scale, "cpu")
    obj = build_objective(cfg.diffusion, V - 1, 0, vocab_size=V)
    x = torch.randint(0, V - 1, (2, 32), generator=torch.Generator().manual_seed(3))
    b = obj.make_batch(x, torch.arange(2), step=0, global_batch_size=2)
    model.zero_grad(set_to_none=True)
    nll = model(b.tokens_BS, None, None, labels=b.labels_BS)
    weighted_token_loss(nll, b.loss_weight_BS, b.num_tokens).backward()
    return model.decoder.layers[0].mlp.router.weight.grad.clone()


def test_aux_loss_joins_the_gradient_with_its_coefficient_and_scale(make):
    """The router's gradient is (diffusion part) + coeff * scale * d(aux)/dW: zero coefficient,
    c and 2c give differences in ratio 1:2, and a scale of 1/2 halves it."""
    grads = {}
    for c in (0.0, 0.01, 0.02):
        model, cfg = make(f"model.moe_aux_loss_coeff={c}")
        grads[c] = _router_grad(model, cfg)
    model, cfg = make("model.moe_aux_loss_coeff=0.02")
    half = _router_grad(model, cfg, scale=0.5)
    d1, d2 = grads[0.01] - grads[0.0], grads[0.02] - grads[0.0]
    assert d1.abs().max() > 1e-6
    torch.testing.assert_close(d2, 2 * d1, atol=1e-8, rtol=1e-4)
    torch.testing.assert_close(half - grads[0.0], d1, atol=1e-8, rtol=1e-4)


def test_ep_must_divide_the_data_parallel_size():
    """parallel.ep splits the DP ranks into expert groups: one process (dp 1) cannot hold EP2.
    Refused in one line before any process group exists."""
    from dlm_megatron.config import ConfigError, load_config
    from dlm_megatron.parallel import dist as pdist

    cfg = load_config(f"{REPO}/configs/tiny_moe.yaml", ["parallel.ep=2"])
    with pytest.raises(ConfigError, match=r"parallel.ep=2 must divide the data-parallel size 1 .*launch a multiple of 2"):
        pdist.init_distributed(cfg)
