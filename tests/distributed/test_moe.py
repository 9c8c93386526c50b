"""Mixture of experts at every proven layout: the same per-step losses and final weights as one
plain process (tests/distributed/reference.py), exact resume at EP2 and at TP2 (sequence
parallel), offline EP2 -> EP1 and TP2 -> TP1 -> TP2 x EP2 resharding, and every discrete
objective training with MoE.

Launches: 3 plain reference processes, one single process running the objectives in sequence,
one torchrun of 2 and one of 4 processes (tests/distributed/run_layouts.py runs several
layouts per launch).
"""
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common import PY, assert_grad_norms_match, metrics, run, torchrun, train_grad_norms, train_losses

from dlm_megatron.checkpoint import load_full_state_dict

pytestmark = pytest.mark.distributed

# 4 experts of 96 SwiGLU units, top-2, per-head q/k norm, LLaDA-MoE's routing (softmax over all
# experts, no top-k renormalisation) and a load-balancing loss large enough to move the router.
MOE = ("model.num_moe_experts=4,model.moe_router_topk=2,model.moe_ffn_hidden_size=96,model.qk_layernorm=true,"
       "model.moe_router_pre_softmax=true,model.moe_aux_loss_coeff=0.05")
# DeepSeek-V3 / LLaDA 2.0 routing: sigmoid scores, aux-loss-free expert bias (megatron engine).
BIAS = ("model.num_moe_experts=4,model.moe_router_topk=2,model.moe_ffn_hidden_size=96,model.moe_router_score_function=sigmoid,"
        "model.moe_router_enable_expert_bias=true,model.moe_router_bias_update_rate=0.01,parallel.engine=megatron")
BLOCK = "diffusion.objective=block,diffusion.block_size=8"
MEGATRON = "parallel.engine=megatron"
# TP2 with sequence parallelism (megatron-core's MoE layer needs it at TP > 1); the experts are
# split over TP too (megatron's expert TP size defaults to tp): fc1 by rows (gate and up halves
# each), fc2 by columns, like the dense MLP.
SP = "parallel.tp=2,parallel.sequence_parallel=true,parallel.engine=megatron,parallel.zero_stage=1"
COMPARE = "train.adam_eps=1e-5"  # see tests/distributed/test_layouts.py: COMPARE

# objective settings; SFT reads SFT_DATA, written by the fixture before anything runs
SFT_DATA = "@SFT@"
_OBJ = {"ar": "diffusion.objective=ar", "uniform": "diffusion.objective=uniform", "hybrid": "diffusion.objective=hybrid",
        "sft": f"data.sft_path={SFT_DATA}"}

# name: (reference, settings, processes)
LAYOUTS = {
    "moe_ep2": ("ref_moe", f"{MOE},{MEGATRON},parallel.ep=2,parallel.zero_stage=1", 2),
    "moe_dp2_deepspeed_zero1": ("ref_moe", f"{MOE},parallel.zero_stage=1", 2),
    "moe_block_ep2": ("ref_moe_block", f"{MOE},{BLOCK},{MEGATRON},parallel.ep=2,parallel.zero_stage=1", 2),
    "moe_bias_ep2": ("ref_moe_bias", f"{BIAS},parallel.ep=2,parallel.zero_stage=1", 2),
    "moe_pp2": ("ref_moe", f"{MOE},parallel.pp=2,parallel.zero_stage=1", 2),
    "moe_ep2_dp2_zero1": ("ref_moe", f"{MOE},{MEGATRON},parallel.ep=2,parallel.zero_stage=1", 4),
    "moe_ep4_zero0": ("ref_moe", f"{MOE},{MEGATRON},parallel.ep=4,parallel.zero_stage=0", 4),
    # stopped after step 2 (checkpoint), then resumed in the same launch at EP2
    "moe_resume_ep2": ("ref_moe", f"{MOE},{MEGATRON},parallel.ep=2,parallel.zero_stage=1", 2),
    "moe_tp2_sp": ("ref_moe", f"{MOE},{SP}", 2),
    "moe_tp2_ep2_sp": ("ref_moe", f"{MOE},{SP},parallel.ep=2", 4),
    # stopped after step 2, resumed at TP2 (weights and optimizer state split over TP, experts too)
    "moe_resume_tp2_sp": ("ref_moe", f"{MOE},{SP}", 2),
    # DeepSpeed ZeRO-2/3 over DP with (replicated) experts, and pipeline x expert parallelism
    "moe_dp2_deepspeed_zero2": ("ref_moe", f"{MOE},parallel.zero_stage=2", 2),
    "moe_dp2_deepspeed_zero3": ("ref_moe", f"{MOE},parallel.zero_stage=3", 2),
    "moe_pp2_ep2": ("ref_moe", f"{MOE},{MEGATRON},parallel.pp=2,parallel.ep=2,parallel.zero_stage=1", 4),
    # the other discrete objectives with experts split over EP ranks, each against its own reference
    **{f"moe_{o}_ep2": (f"ref_moe_{o}", f"{MOE},{MEGATRON},parallel.ep=2,parallel.zero_stage=1,{_OBJ[o]}", 2)
       for o in ("ar", "uniform", "hybrid", "sft")},
}
RESUMED = {"moe_resume_ep2": "moe_ep2", "moe_resume_tp2_sp": "moe_tp2_sp"}  # resumed run: its uninterrupted twin
REFERENCES = {"ref_moe": MOE, "ref_moe_block": f"{MOE},{BLOCK}", "ref_moe_bias": BIAS,
              **{f"ref_moe_{o}": f"{MOE},{_OBJ[o]}" for o in ("ar", "uniform", "hybrid", "sft")}}
OBJECTIVES = ("masked", "block", "ar", "uniform", "hybrid", "sft")


def _sft_data(path: Path) -> Path:
    r = random.Random(0)
    words = "king queen sword crown night love death rose".split()
    with path.open("w") as f:
        for _ in range(64):
            w = r.choice(words)
            f.write(json.dumps({"prompt": f"Repeat: {w}\n", "response": f"{w} {w} {w}"}) + "\n")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    sft = _sft_data(root / "sft.jsonl")
    for name, settings in REFERENCES.items():
        run([PY, "tests/distributed/reference.py", str(root / name), *settings.replace(SFT_DATA, str(sft)).split(","), COMPARE])
    specs = {n: [] for n in (2, 4)}
    for name, (_, settings, n) in LAYOUTS.items():
        settings = settings.replace(SFT_DATA, str(sft))
        if name in RESUMED:
            specs[n] += [f"{name}:{settings},{COMPARE},@stop=2", f"{name}:{settings},{COMPARE}"]
        else:
            specs[n].append(f"{name}:{settings},{COMPARE}")
    for n in (2, 4):
        torchrun(n, "tests/distributed/run_layouts.py", str(root), *specs[n])
    objectives = [f"obj_{o}:{MOE},train.steps=16,train.lr=3e-3,"
                  + (f"data.sft_path={sft},data.seq_len=16" if o == "sft" else f"diffusion.objective={o}")
                  + (",diffusion.block_size=8" if o == "block" else "") for o in OBJECTIVES]
    run([PY, "tests/distributed/run_layouts.py", str(root), *objectives])
    return root


# fp32 reduction order (gradients summed over ranks, ZeRO-1's partitioned clipping norm) moves
# weights by float32 rounding per step, which Adam (eps 1e-5, see COMPARE) turns into at most a
# few 1e-5 after 4 steps of lr 1e-2: measured 1.5e-5 (DeepSpeed ZeRO-1 and EP2 x DP2 with the
# distributed optimizer), 5e-7 for EP2 / EP4 without DP reduction of expert gradients.
TOL = 5e-5
LOSS_TOL = 1e-5  # measured 2.7e-6


def _final(run_dir: Path) -> dict:
    return load_full_state_dict(sorted((run_dir / "checkpoints").glob("step_*"))[-1])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_moe_layout_matches_one_process(runs, layout):
    refname = LAYOUTS[layout][0]
    ref_losses = json.loads((runs / refname / "losses.json").read_text())
    losses = train_losses(runs / layout)
    assert len(losses) == len(ref_losses) == 4, losses
    for step, (a, b) in enumerate(zip(losses, ref_losses), 1):
        assert a == pytest.approx(b, abs=LOSS_TOL), f"{layout}: step {step} loss {a} != one process {b}"
    assert_grad_norms_match(layout, train_grad_norms(runs / layout), json.loads((runs / refname / "grad_norms.json").read_text()))
    ref = load_file(str(runs / refname / "params.safetensors"))
    got = _final(runs / layout)
    assert set(got) == set(ref)
    assert sum(".local_experts." in k for k in ref) == 2 * 4 * 2  # 2 layers x 4 experts x (fc1, fc2)
    for k in ref:
        diff = (got[k] - ref[k]).abs().max().item()
        assert diff <= TOL, f"{layout}: {k} differs from one process by {diff:.2e}"


def test_moe_metrics_are_layout_independent(runs):
    """moe_aux_loss and moe_max_load are sums over data-parallel ranks: every layout of the
    same model reports the same numbers, and the router moved (aux loss is not constant)."""
    rows = {k: [r for r in metrics(runs / k) if r.get("split") != "val"]
            for k in ("moe_ep2", "moe_dp2_deepspeed_zero1", "moe_ep2_dp2_zero1", "moe_ep4_zero0", "moe_pp2", "moe_tp2_sp",
                      "moe_tp2_ep2_sp")}
    base = rows["moe_ep2"]
    assert all(1.0 <= r["moe_max_load"] <= 4.0 and r["moe_aux_loss"] >= 1.0 - 1e-6 for r in base), base
    for name, rs in rows.items():
        for a, b in zip(rs, base):
            assert a["moe_aux_loss"] == pytest.approx(b["moe_aux_loss"], abs=1e-5), name
            assert a["moe_max_load"] == pytest.approx(b["moe_max_load"], abs=1e-9), name
    assert len({round(r["moe_aux_loss"], 6) for r in base}) > 1


def test_expert_bias_moved_and_is_saved(runs):
    got = _final(runs / "moe_bias_ep2")
    biases = [v for k, v in got.items() if k.endswith(".router.expert_bias")]
    assert len(biases) == 2 and all(b.abs().max() > 0 for b in biases)


@pytest.mark.parametrize("resumed", list(RESUMED))
def test_resume_is_exact(runs, resumed):
    """Stopped after step 2 and resumed (at EP2; at TP2 with sequence parallelism): the same
    losses and weights as the uninterrupted run."""
    a, b = train_losses(runs / resumed), train_losses(runs / RESUMED[resumed])
    assert len(a) == 4 and a == b  # bitwise: weights, Adam moments and step restored exactly
    got, want = _final(runs / resumed), _final(runs / RESUMED[resumed])
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_ep2_files_hold_their_experts(runs):
    ckpt = sorted((runs / "moe_ep2" / "checkpoints").glob("step_*"))[-1]
    assert sorted(p.name for p in (ckpt / "model").iterdir()) == ["tp0_pp0.safetensors", "tp0_pp0_ep1.safetensors"]
    ep1 = load_file(str(ckpt / "model" / "tp0_pp0_ep1.safetensors"))
    assert ep1 and all(".local_experts.2." in k or ".local_experts.3." in k for k in ep1)


def test_reshard_ep2_to_ep1_offline(runs, tmp_path):
    from dlm_megatron.checkpoint import read_meta
    from dlm_megatron.convert.reshard import reshard

    src = runs / "moe_ep2"
    out = reshard(src, tmp_path / "ep1", tp=1, pp=1, ep=1, show_progress=False)
    assert [p.name for p in (out / "model").iterdir()] == ["tp0_pp0.safetensors"]
    assert read_meta(out)["layout"]["ep"] == 1
    a, b = _final(src), load_full_state_dict(out)
    assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a)
    back = reshard(out, tmp_path / "ep2", tp=1, pp=1, ep=2, show_progress=False)
    assert sorted(p.name for p in (back / "model").iterdir()) == ["tp0_pp0.safetensors", "tp0_pp0_ep1.safetensors"]


def test_reshard_te_moe_to_tp2_continues_on_the_local_spec(runs, tmp_path, capsys):
    """A Transformer Engine MoE checkpoint (same canonical names as the local spec's) resharded
    to tp=2: MoE there needs sequence parallelism, proven on the local spec only, so the new
    config says local, with a note; the weights are the source's."""
    import shutil

    from dlm_megatron.checkpoint import read_meta
    from dlm_megatron.convert.reshard import reshard

    src = tmp_path / "te_run"
    shutil.copytree(runs / "moe_ep2", src)
    ckpt = sorted((src / "checkpoints").glob("step_*"))[-1]
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["config"]["model"]["transformer_impl"] = "transformer_engine"
    (ckpt / "meta.json").write_text(json.dumps(meta))
    out = reshard(src, tmp_path / "tp2", tp=2, pp=1, ep=1, show_progress=False)
    assert "sets model.transformer_impl=local" in capsys.readouterr().err
    cfg = read_meta(out)["config"]
    assert cfg["model"]["transformer_impl"] == "local" and cfg["parallel"]["sequence_parallel"] is True
    a, b = load_full_state_dict(ckpt), load_full_state_dict(out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_reshard_bad_ep_is_one_line(runs, tmp_path):
    """tools/convert.py reshard --ep that the model cannot take: one line, exit 2, nothing written."""
    for ep, needle in (("3", "not divisible by parallel.ep=3"), ("0", "must be >= 1")):
        p = run([PY, "tools/convert.py", "reshard", "--ckpt", str(runs / "moe_ep2"), "--output", str(tmp_path / f"ep{ep}"),
                 "--tp", "1", "--pp", "1", "--ep", ep], check=False)
        err = p.stderr.strip()
        assert p.returncode == 2 and len(err.splitlines()) == 1 and needle in err, (ep, p.returncode, p.stderr)
        assert not (tmp_path / f"ep{ep}").exists()


def test_reshard_tp2_to_tp1_and_tp2_ep2_offline(runs, tmp_path):
    """A TP2 (sequence parallel) MoE checkpoint: each TP file holds half of every expert (fc1's
    gate and up rows, fc2's columns); resharded to TP1 it is the same model (and equals one
    process, test_moe_layout_matches_one_process), and back to TP2 x EP2 (sequence parallel
    switched on again, as MoE at TP>1 needs)."""
    from dlm_megatron.checkpoint import read_meta
    from dlm_megatron.convert.reshard import reshard

    src = runs / "moe_tp2_sp"
    ckpt = sorted((src / "checkpoints").glob("step_*"))[-1]
    tp1 = load_file(str(ckpt / "model" / "tp1_pp0.safetensors"))
    fc1 = "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight"
    assert tp1[fc1].shape == (96, 64) and tp1[fc1.replace("fc1", "fc2")].shape == (64, 48)  # 2 x 96 SwiGLU rows / 2
    out = reshard(src, tmp_path / "tp1", tp=1, pp=1, ep=1, show_progress=False)
    assert [p.name for p in (out / "model").iterdir()] == ["tp0_pp0.safetensors"]
    assert read_meta(out)["config"]["parallel"]["sequence_parallel"] is False
    a, b = _final(src), load_full_state_dict(out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    back = reshard(out, tmp_path / "tp2ep2", tp=2, pp=1, ep=2, show_progress=False)
    assert read_meta(back)["config"]["parallel"]["sequence_parallel"] is True
    assert sorted(p.name for p in (back / "model").iterdir()) == [
        "tp0_pp0.safetensors", "tp0_pp0_ep1.safetensors", "tp1_pp0.safetensors", "tp1_pp0_ep1.safetensors"]
    c = load_full_state_dict(back)
    assert all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objectives_train_with_moe(runs, objective):
    rows = [r for r in metrics(runs / f"obj_{objective}") if r.get("split") != "val"]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 16 and all(r["moe_max_load"] >= 1 and r["moe_aux_loss"] > 0 for r in rows)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.3, f"{objective}: loss did not fall: {first:.3f} -> {last:.3f}"


def test_generate_from_a_tp2_ep2_sequence_parallel_checkpoint(runs):
    """Inference runs the merged model in one process: a checkpoint trained at TP2 x EP2 with
    sequence parallelism loads there (no sequence split, all experts) and samples."""
    p = run([PY, "-m", "dlm_megatron.generate", "--ckpt", str(runs / "moe_tp2_ep2_sp"), "--prompt", "To be",
             "--gen-length", "8", "--steps", "4"])
    assert p.stdout.strip().splitlines()[-1].startswith("To be"), p.stdout[-500:]


def test_planner_ep2_states_match_the_engine(tmp_path):
    """The planner's per-GPU weights, fp32 gradient buffers and distributed-optimizer states at
    EP2 x DP2 (experts halved per rank; expert states sharded over expert-DP size 1, dense
    ones over DP 2) against the real megatron engine's tensors on each rank, bf16: measured
    within 0.03% (padding of megatron's buffers). At EP1 the plan is 1.33x larger in weights
    and gradients, so the check sees the expert split."""
    out = tmp_path / "states.json"
    torchrun(2, "tests/distributed/check_moe_states.py", str(out), "parallel.ep=2", "parallel.engine=megatron",
             "parallel.zero_stage=1")
    r = json.loads(out.read_text())
    for rank in r["ranks"]:
        for k, planned in r["planned"].items():
            assert rank[k] == pytest.approx(planned, rel=1e-3), (k, rank[k], planned)
    from dlm_megatron.config import load_config
    from dlm_megatron.planner import plan
    from common import COMMON_OVERRIDES, REPO

    ep1 = plan(load_config(f"{REPO}/configs/tiny_moe.yaml", list(COMMON_OVERRIDES) + ["train.precision=bf16",
               "parallel.engine=megatron", "parallel.zero_stage=1"]), gpus=2,
               gpu_mem_gib=80.0, vocab_size=8192, on_gpu=False)["memory"]
    assert ep1["weights"] > 1.2 * r["planned"]["weights"], (ep1["weights"], r["planned"]["weights"])
