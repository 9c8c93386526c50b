"""Initialisation draws on the compute device (issue 10 item 7), checked without a GPU.

An 8B model drawn on the host takes minutes of single-threaded CPU work; drawn where the
parameters live it takes seconds. On a CPU machine a draw that silently went to the host
would look the same, so these tests watch what the draws are asked for: the model is moved
to the "meta" device (a device that is not the CPU and needs no GPU), and the random draw
functions are replaced by recorders.
"""
import types

import pytest
import torch

from dlm_megatron.model import sharding

SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
         "data.seq_len=32", "logging.wandb=disabled"]
VOCAB = 512


@pytest.fixture(scope="module")
def cfg():
    from dlm_megatron.config import load_config
    from dlm_megatron.parallel import dist as pdist
    from dlm_megatron.train import quiet_warnings

    quiet_warnings()
    c = load_config("configs/tiny.yaml", SMALL)
    pdist.init_distributed(c)
    return c


def test_init_full_draws_on_the_device_it_is_given(monkeypatch):
    """The generator and the normal draw are both made on ``device``, in fp32."""
    asked = []
    real_generator = torch.Generator

    def generator(device="cpu"):
        asked.append(("generator", torch.device(device)))
        return real_generator()  # a CPU generator stands in for the device's

    def randn(*shape, generator=None, device=None, dtype=None, **_):
        asked.append(("randn", torch.device(device) if device is not None else None, dtype))
        return torch.zeros(*shape)

    # only sharding's view of torch is replaced (torch itself checks isinstance(x, torch.Generator))
    monkeypatch.setattr(sharding, "torch", types.SimpleNamespace(**{**vars(torch), "Generator": generator, "randn": randn}))
    meta = torch.device("meta")
    sharding.init_full("decoder.layers.0.mlp.linear_fc1.weight", (4, 3), seed=1, std=0.02, num_layers=2, device=meta)
    assert asked == [("generator", meta), ("randn", meta, None)]  # dtype None: torch's default, fp32


def test_init_weights_draws_where_each_parameter_lives(cfg, monkeypatch):
    """init_weights asks init_full for every parameter's full tensor on that parameter's device."""
    from dlm_megatron.model.denoiser import build_model, canonical_params, init_weights

    model = build_model(cfg, VOCAB, pre_process=True, post_process=True).to("meta")
    asked = {}

    def init_full(name, shape, *, seed, std, num_layers, device="cpu"):
        asked[name] = torch.device(device)
        return torch.zeros(shape, device=device)

    monkeypatch.setattr(sharding, "init_full", init_full)
    init_weights(model, cfg, tp_rank=0, pp_rank=0)
    names = [n for n, _ in canonical_params(model, cfg, 0)]
    assert sorted(asked) == sorted(names) and len(names) > 10
    assert set(asked.values()) == {torch.device("meta")}, asked


def test_trainer_moves_the_model_to_its_device_before_drawing(cfg, monkeypatch):
    """The trainer builds the model, moves it to the rank's device, then initialises it."""
    from dlm_megatron.model import denoiser
    from dlm_megatron.train import Trainer

    seen = []
    monkeypatch.setattr(denoiser, "init_weights", lambda model, *a, **k: seen.append({p.device for p in model.parameters()}))
    lay = types.SimpleNamespace(device=torch.device("meta"), is_first_stage=True, is_last_stage=True, tp_rank=0, pp_rank=0,
                                ep_rank=0)
    fake = types.SimpleNamespace(cfg=cfg, lay=lay, vocab=VOCAB, bf16=False, rank0=True)
    Trainer._build_model(fake, None)
    assert seen == [{torch.device("meta")}]
