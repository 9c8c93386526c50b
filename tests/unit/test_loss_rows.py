"""The output layer and cross-entropy run only on positions that carry loss (loss_index):
the per-token NLL there, the loss and every gradient equal the full-logits path, the rest
is exactly 0, and the work shrinks to the selected rows."""
import pytest
import torch

V = 512
SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
         "data.seq_len=32", "diffusion.block_size=8", "logging.wandb=disabled"]


@pytest.fixture(scope="module")
def make():
    from dlm_megatron.config import load_config
    from dlm_megatron.model.denoiser import build_model, init_weights
    from dlm_megatron.parallel import dist as pdist
    from dlm_megatron.train import quiet_warnings

    quiet_warnings()
    pdist.init_distributed(load_config("configs/tiny.yaml", SMALL))

    def build(objective, *extra):
        cfg = load_config("configs/tiny.yaml", SMALL + [f"diffusion.objective={objective}", *extra])
        model = build_model(cfg, V, pre_process=True, post_process=True)
        init_weights(model, cfg, tp_rank=0, pp_rank=0)
        return model, cfg

    return build


@pytest.mark.parametrize("objective,extra", [("masked", ()), ("block", ()), ("masked", ("model.tie_embeddings=true",)),
                                             ("ar", ())])
def test_selected_rows_equal_the_full_output(make, objective, extra):
    from dlm_megatron.diffusion.masked import weighted_token_loss
    from dlm_megatron.diffusion.objectives import build_objective
    from dlm_megatron.train import loss_index

    model, cfg = make(objective, *extra)
    obj = build_objective(cfg.diffusion, V - 1, 0, vocab_size=V)
    x = torch.randint(0, V - 1, (3, 32), generator=torch.Generator().manual_seed(1))
    b = obj.make_batch(x, torch.arange(3), step=0, global_batch_size=3)
    idx = loss_index(b.loss_weight_BS)
    assert 0 < idx.numel() < b.loss_weight_BS.numel() or objective == "ar"
    results = {}
    for name, kw in (("full", {}), ("rows", {"loss_index": idx})):
        model.zero_grad(set_to_none=True)
        nll = model(b.tokens_BS, b.position_ids_BS, b.attention_mask, labels=b.labels_BS,
                    explicit_positions=b.position_ids_BS is not None, **kw)
        loss = weighted_token_loss(nll, b.loss_weight_BS, b.num_tokens)
        loss.backward()
        results[name] = (nll.detach(), loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (nll_f, loss_f, g_f), (nll_r, loss_r, g_r) = results["full"], results["rows"]
    w = b.loss_weight_BS != 0
    assert torch.allclose(nll_r[w], nll_f[w], atol=1e-6) and torch.equal(nll_r[~w], torch.zeros_like(nll_r[~w]))
    assert loss_r == pytest.approx(loss_f, abs=1e-6)
    for n in g_f:
        assert torch.allclose(g_r[n], g_f[n], atol=1e-7), n


def test_only_the_selected_rows_reach_the_output_layer(make):
    from dlm_megatron.diffusion.objectives import build_objective
    from dlm_megatron.train import loss_index

    model, cfg = make("block")
    obj = build_objective(cfg.diffusion, V - 1, 0, vocab_size=V)
    b = obj.make_batch(torch.randint(0, V - 1, (2, 32), generator=torch.Generator().manual_seed(2)), torch.arange(2),
                       step=0, global_batch_size=2)
    idx = loss_index(b.loss_weight_BS)
    seen = []
    h = model.output_layer.register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    model(b.tokens_BS, b.position_ids_BS, b.attention_mask, labels=b.labels_BS, explicit_positions=True, loss_index=idx)
    h.remove()
    # block diffusion: only masked x_t tokens carry loss, i.e. fewer than half of the 2L rows
    assert seen == [torch.Size([idx.numel(), 1, 64])] and idx.numel() < b.tokens_BS.numel() // 2


def test_loss_index_is_never_empty():
    from dlm_megatron.train import loss_index

    assert loss_index(torch.zeros(2, 4)).tolist() == [0]
    w = torch.tensor([[0.0, 2.0], [1.0, 0.0]])  # [B=2, S=2] -> flat s * B + b
    assert loss_index(w).tolist() == [1, 2]


def test_inputs_go_to_the_device_and_host_inputs_stay_on_the_host():
    """LossFn.forward moves tokens, labels and loss rows to the compute device ('meta' here
    stands for CUDA) but hands continuous diffusion's sigma and noise seeds over on the host:
    the model draws the noise there, so a device copy would be read back every micro-batch."""
    from types import SimpleNamespace

    from dlm_megatron.train import LossFn

    seen = {}

    def model(tokens, positions, mask, labels=None, **kw):
        seen.update({"tokens": tokens.device.type, "labels": labels.device.type,
                     **{k: v.device.type for k, v in kw.items() if isinstance(v, torch.Tensor)}})

    w = torch.tensor([[1.0, 0.0, 1.0]])
    b = SimpleNamespace(tokens_BS=torch.zeros(1, 3, dtype=torch.long), position_ids_BS=None, attention_mask=None,
                        labels_BS=torch.zeros(1, 3, dtype=torch.long), loss_weight_BS=w,
                        model_kwargs={"sigma_B": torch.ones(1), "noise_seed_B": torch.zeros(1, dtype=torch.long)})
    LossFn(torch.device("meta")).forward(model, b)
    assert seen == {"tokens": "meta", "labels": "meta", "loss_index": "meta", "sigma_B": "cpu", "noise_seed_B": "cpu"}
