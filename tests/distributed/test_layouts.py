"""Layout independence: every supported parallel layout trains like plain single-process AdamW.

One torchrun launch per world size runs several layouts in sequence (tests/distributed/
run_layouts.py); a plain-PyTorch loop without DeepSpeed (reference.py) is the yardstick.
Compared: the per-step loss in metrics.jsonl and the final weights in the checkpoint.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common import REPO, PY, assert_grad_norms_match, run, torchrun, train_grad_norms, train_losses

from dlm_megatron.checkpoint import load_full_state_dict

pytestmark = pytest.mark.distributed

WORLD2 = {
    "tp2": "parallel.tp=2",
    "pp2_zero0": "parallel.pp=2,parallel.zero_stage=0",
    "pp2_zero1": "parallel.pp=2,parallel.zero_stage=1",
    "dp2_zero0": "parallel.zero_stage=0,train.eval_interval=2",
    "dp2_zero1": "parallel.zero_stage=1",
    "dp2_zero2": "parallel.zero_stage=2",
    "dp2_zero3": "parallel.zero_stage=3",
    "megatron_dp2": "parallel.engine=megatron,parallel.zero_stage=1,train.eval_interval=2",
    # sequence parallelism on the local spec (model/norm.py): norm gradients summed over TP
    "sp_tp2": "parallel.tp=2,parallel.sequence_parallel=true,parallel.engine=megatron,parallel.zero_stage=1",
}
# LLaDA's random length under sequence parallelism (rounded up to a multiple of tp), against
# the plain loop rounding the same way (reference.py @length_multiple=2); see
# test_sequence_parallel_random_length.
SP_RANDOM_LENGTH = ("sp_tp2_random_length", "parallel.tp=2,parallel.sequence_parallel=true,parallel.engine=megatron,"
                    "parallel.zero_stage=1,diffusion.random_length_prob=0.5")
# Sequence parallel: megatron engine; the layouts below add it to block diffusion (2L input,
# arbitrary mask), uniform noise (logits over the whole sequence) and SFT (batch-padded lengths).
SP = "parallel.tp=2,parallel.sequence_parallel=true,parallel.engine=megatron,parallel.zero_stage=1"
WORLD4 = {
    "tp2_pp2": "parallel.tp=2,parallel.pp=2,parallel.zero_stage=1",
    "pp2_dp2_zero1": "parallel.pp=2,parallel.zero_stage=1",
    "tp2_dp2_zero1": "parallel.tp=2,parallel.zero_stage=1",
    "tp2_dp2_zero2": "parallel.tp=2,parallel.zero_stage=2",
    "tp2_dp2_zero3": "parallel.tp=2,parallel.zero_stage=3",
    "megatron_tp2_dp2": "parallel.engine=megatron,parallel.tp=2,parallel.zero_stage=0",
    "sp_tp2_pp2": f"{SP},parallel.pp=2",
}

# Tied input/output embeddings: at pp=2 the last stage's copy of the embedding must start
# equal to the first stage's and stay tied (megatron all-reduces their gradients).
TIED = "model.tie_embeddings=true"
TIED_LAYOUTS = {
    "tied_pp2": "parallel.pp=2,parallel.zero_stage=1",
    "tied_dp2_zero1": "parallel.zero_stage=1",
}

# Per-head q/k norms (Qwen3 / LLaDA-MoE): at tp=2 each rank normalises only its heads, so the
# shared norm weights' gradient is summed over TP; parallel.engine=auto picks the megatron
# engine, whose finalize step does it (DeepSpeed would not, and is refused).
QK = "model.qk_layernorm=true"
QK_LAYOUTS = {"qk_norm_tp2_auto": "parallel.tp=2,parallel.zero_stage=1"}

# Without clipping: every step above is clipped (norms 3 to 5 > grad_clip=1), so the update
# sees only the gradient's direction; here the weights see its scale too (the logged norms
# are compared in every layout). DeepSpeed with accumulation over DP, and the megatron engine.
NOCLIP = "train.grad_clip=0"
NOCLIP_LAYOUTS = {"noclip_dp2_zero1": "parallel.zero_stage=1", "noclip_pp2_megatron": "parallel.pp=2,parallel.zero_stage=1"}


# Adam's step m/(sqrt(v)+eps) is about lr * sign(g) for any |g| >> eps: near g = 0 it is a
# step function. With the default eps = 1e-8, a gradient coordinate that is ~0 (block
# diffusion's unattended last clean block: exactly 0 in exact arithmetic; or, by chance, one
# coordinate of an embedding row at its first update: 4e-8 where the row's median is 5e-4
# in uniform_tp2) turns the layouts' tiny gradient differences (fp32 reduction order, then
# weights a few 1e-6 apart: up to ~1e-6 per coordinate) into steps up to lr (1e-2 here)
# apart. The comparison runs use eps = 1e-5, above those differences and below real
# gradients (median coordinate ~5e-4), so Adam is continuous there and every layout must
# match within TOL everywhere, block diffusion included.
COMPARE = ("train.adam_eps=1e-5",)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    run([PY, "tests/distributed/reference.py", str(root / "reference"), *COMPARE])
    run([PY, "tests/distributed/reference.py", str(root / "reference_block"), *BLOCK.split(","), *COMPARE])
    run([PY, "tests/distributed/reference.py", str(root / "reference_tied"), TIED, *COMPARE])
    run([PY, "tests/distributed/reference.py", str(root / "reference_qk"), QK, *COMPARE])
    run([PY, "tests/distributed/reference.py", str(root / "reference_noclip"), NOCLIP, *COMPARE])
    run([PY, "tests/distributed/reference.py", str(root / "reference_random_length"), "diffusion.random_length_prob=0.5",
         "@length_multiple=2", *COMPARE])
    for obj in sorted({obj for obj, _, _ in VOCAB_LAYOUTS.values()}):
        run([PY, "tests/distributed/reference.py", str(root / f"reference_{obj}"), f"diffusion.objective={obj}", *COMPARE])
    sft = f"data.sft_path={write_sft_data(root / 'sft.jsonl')}"
    run([PY, "tests/distributed/reference.py", str(root / "reference_sft"), sft, *COMPARE])
    # The RESUME runs stop after step 2 at one DP size and are finished by the next launch
    # at another DP size.
    docs = f"data.train_path={write_doc_shards(root / 'docs')},data.document_masks=true"
    specs2 = [*[f"{k}:{v}" for k, v in WORLD2.items()], ":".join(SP_RANDOM_LENGTH),
              *[f"{k}:{docs},{v}" for k, v in DOC_LAYOUTS.items()],
              *[f"{k}:{BLOCK},{v}" for k, v in BLOCK_LAYOUTS.items()],
              *[f"{k}:{TIED},{v}" for k, v in TIED_LAYOUTS.items()],
              *[f"{k}:{QK},{v}" for k, v in QK_LAYOUTS.items()],
              *[f"{k}:{NOCLIP},{v}" for k, v in NOCLIP_LAYOUTS.items()],
              *[f"{k}:{sft},{v}" for k, v in SFT_LAYOUTS.items()],
              *[f"{k}:{sft},{v},@stop=2" for k, (v, _) in SFT_RESUME.items()],
              *[f"{k}:diffusion.objective={obj},{v}" for k, (obj, v, n) in VOCAB_LAYOUTS.items() if n == 2],
              *[f"{k}:{v},@stop=2" for k, (v, _) in RESUME.items()]]
    specs4 = [*[f"{k}:{v}" for k, v in WORLD4.items()],
              *[f"{k}:diffusion.objective={obj},{v}" for k, (obj, v, n) in VOCAB_LAYOUTS.items() if n == 4],
              *[f"{k}:{v}" for k, (_, v) in RESUME.items()],
              *[f"{k}:{sft},{v}" for k, (_, v) in SFT_RESUME.items()]]
    torchrun(2, "tests/distributed/run_layouts.py", str(root), *[",".join((s, *COMPARE)) for s in specs2])
    torchrun(4, "tests/distributed/run_layouts.py", str(root), *[",".join((s, *COMPARE)) for s in specs4])
    return root


# Block diffusion (2L input, arbitrary mask, repeated RoPE positions) under TP and PP.
BLOCK = "diffusion.objective=block,diffusion.block_size=8"
BLOCK_LAYOUTS = {
    "block_tp2": "parallel.tp=2",
    "block_pp2": "parallel.pp=2,parallel.zero_stage=1",
    "block_dp2_zero2": "parallel.zero_stage=2",
    "block_tp2_sp": SP,
}

# Other objectives, each against its own reference. Uniform / hybrid noise: the loss sums over
# the whole vocabulary, reduced across the TP ranks' vocab-parallel logits (diffusion/
# uniform.py). AR under sequence parallelism: causal attention over the gathered sequence,
# next-token labels across the TP ranks' sequence slices. name: (objective, layout, processes)
VOCAB_LAYOUTS = {
    "uniform_tp2": ("uniform", "parallel.tp=2", 2),
    "hybrid_tp2_dp2_zero1": ("hybrid", "parallel.tp=2,parallel.zero_stage=1", 4),
    "uniform_tp2_sp": ("uniform", SP, 2),
    "ar_tp2_sp": ("ar", SP, 2),
}

# SFT with variable length (data.sft_padding=batch): each global batch padded to its longest
# example. dp2 is the case where a rank's own rows are shorter than the batch's longest.
SFT_LAYOUTS = {
    "sft_tp2": "parallel.tp=2",
    "sft_dp2_zero1": "parallel.zero_stage=1",
    "sft_tp2_sp": SP,
}
# The padded length is a pure function of the step: stopped after step 2 at dp2 and resumed at
# dp4, the run still equals the reference.
SFT_RESUME = {"sft_resume_dp2_to_dp4": ("parallel.zero_stage=0", "parallel.zero_stage=0")}


# The SFT loss is a mean over a few masked response tokens each weighted by L_b / (|response| t),
# several times the pretraining weight 1/t, so the layouts' fp32 differences in the weights
# (1.5e-5 at most after 4 steps, within TOL below) move it more: measured 1.6e-5 (tp2) and
# 3.0e-5 (dp2) at step 4, step 1 equal to every printed digit. A wrong padding length moves it
# by 0.1 or more (per-rank instead of global length at dp2: 0.79 at step 3; seq_len instead of
# the batch's length doubles the normaliser), so 1e-4 still separates them.
SFT_LOSS_TOL = 1e-4


def write_sft_data(path: Path) -> Path:
    """48 prompt/response pairs, most a few tokens long and one in eight about 20, so the
    global batches (8 samples) pad to different lengths, most below data.seq_len=32."""
    import random

    r = random.Random(0)
    words = "king queen sword crown night love death rose".split()
    with path.open("w") as f:
        for i in range(48):
            n = 8 if i % 8 == 0 else r.randint(1, 3)
            f.write(json.dumps({"prompt": f"Say {r.choice(words)}:", "response": " ".join(r.choice(words) for _ in range(n))}) + "\n")
    return path


# name: (layout of the first 2 steps on 2 processes, layout of the last 2 on 4 processes)
RESUME = {
    "resume_deepspeed_dp2_to_dp4": ("parallel.zero_stage=0", "parallel.zero_stage=0"),
    "resume_megatron_pp2_dp1_to_dp2": ("parallel.pp=2,parallel.zero_stage=1", "parallel.pp=2,parallel.zero_stage=1"),
}


def _final_params(run_dir: Path) -> dict:
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    return load_full_state_dict(ckpts[-1])


@pytest.mark.parametrize("layout", list(WORLD2) + list(WORLD4) + list(RESUME) + list(BLOCK_LAYOUTS) + list(VOCAB_LAYOUTS)
                         + list(TIED_LAYOUTS) + list(QK_LAYOUTS) + list(NOCLIP_LAYOUTS) + list(SFT_LAYOUTS) + list(SFT_RESUME))
def test_layout_matches_plain_adamw(runs, layout):
    refname = ("reference_block" if layout in BLOCK_LAYOUTS else "reference_tied" if layout in TIED_LAYOUTS else
               "reference_qk" if layout in QK_LAYOUTS else "reference_noclip" if layout in NOCLIP_LAYOUTS else
               "reference_sft" if layout in SFT_LAYOUTS or layout in SFT_RESUME else
               f"reference_{VOCAB_LAYOUTS[layout][0]}" if layout in VOCAB_LAYOUTS else "reference")
    ref_losses = json.loads((runs / refname / "losses.json").read_text())
    losses = train_losses(runs / layout)
    assert len(losses) == len(ref_losses) == 4
    tol = SFT_LOSS_TOL if layout in SFT_LAYOUTS or layout in SFT_RESUME else 2e-5
    for step, (a, b) in enumerate(zip(losses, ref_losses), 1):
        assert a == pytest.approx(b, abs=tol), f"{layout}: step {step} loss {a} != reference {b}"
    assert_grad_norms_match(layout, train_grad_norms(runs / layout), json.loads((runs / refname / "grad_norms.json").read_text()))
    ref = load_file(str(runs / refname / "params.safetensors"))
    got = _final_params(runs / layout)
    assert set(got) == set(ref)
    # Every weight of every layout within TOL of the reference (measured: 3.4e-5 at most, for
    # uniform_tp2; see COMPARE for why there is no per-coordinate allowance).
    assert_weights_match(layout, got, ref)


TOL = 2e-4


def assert_weights_match(layout: str, got: dict, ref: dict) -> None:
    for k in ref:
        diff = (got[k] - ref[k]).abs()
        off = int((diff > TOL).sum())
        assert off == 0, f"{layout}: {k}: {off} coordinates differ from the reference by > {TOL} (max {diff.max().item():.2e})"


# Document masks ([b, 1, s, s] boolean masks between packed documents) under sequence
# parallelism: the attention sees the whole sequence after the QKV all-gather, so the masks
# are the full ones. Compared with the megatron engine at DP2 (itself equal to plain AdamW
# above; reference.py does not build document masks).
DOC_LAYOUTS = {"docmask_dp2": "parallel.engine=megatron,parallel.zero_stage=1", "docmask_tp2_sp": SP}


def write_doc_shards(out: Path) -> Path:
    """400 short documents (about 12 tokens each, several per 32-token sample) as megatron shards."""
    out.mkdir()
    src = out / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"Doc {i}: thou art {'fair' if i % 2 else 'foul'} indeed."}) + "\n"
                           for i in range(400)))
    run([PY, "tools/shard.py", "--input", str(src), "--field", "text", "--tokenizer", "builtin", "--output", str(out / "shards"),
         "--format", "megatron", "--workers", "1", "--no-progress"])
    return out / "shards"


def test_document_masks_under_sequence_parallel(runs):
    """Measured: losses 1.0e-5, weights 4.2e-6 apart. Without document masks the losses move by
    2.8e-3 at step 1 and 6e-2 at step 3, so the comparison tells masked from unmasked attention."""
    a, b = train_losses(runs / "docmask_tp2_sp"), train_losses(runs / "docmask_dp2")
    assert len(a) == len(b) == 4 and a == pytest.approx(b, abs=2e-5), (a, b)
    assert_weights_match("docmask_tp2_sp", _final_params(runs / "docmask_tp2_sp"), _final_params(runs / "docmask_dp2"))


def test_sequence_parallel_random_length(runs):
    """diffusion.random_length_prob under sequence parallelism: steps cut to a drawn length that
    tp=2 does not divide run at the length rounded up to even (megatron splits the sequence
    over the TP ranks), and train like the plain loop cutting to the same rounded lengths."""
    from dlm_megatron.diffusion.objectives import step_random_length

    drawn = [step_random_length(1234, s, 32, 0.5) for s in range(4)]
    assert any(L % 2 for L in drawn), drawn  # the case that needs rounding happens in this run
    name, ref = SP_RANDOM_LENGTH[0], runs / "reference_random_length"
    losses, ref_losses = train_losses(runs / name), json.loads((ref / "losses.json").read_text())
    assert len(losses) == len(ref_losses) == 4
    for step, (a, b) in enumerate(zip(losses, ref_losses), 1):
        assert a == pytest.approx(b, abs=2e-5), f"{name}: step {step} loss {a} != reference {b}"
    assert_grad_norms_match(name, train_grad_norms(runs / name), json.loads((ref / "grad_norms.json").read_text()))
    assert_weights_match(name, _final_params(runs / name), load_file(str(ref / "params.safetensors")))


def test_validation_between_steps_sees_gathered_weights(runs):
    """The megatron engine overlaps its distributed optimizer's parameter all-gather with
    the next forward: validation mid-run (step 2) and at the end must still see every
    rank's update, i.e. report what DeepSpeed ZeRO-0 (complete weights after every step)
    reports on the same weights (which match to 2e-4: a loss difference of ~1e-5)."""
    def val(name):
        rows = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if r.get("split") == "val"}

    ref, got = val("dp2_zero0"), val("megatron_dp2")
    assert sorted(ref) == sorted(got) == [2, 4]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=1e-4), (step, got[step], ref[step])


def test_weight_tolerance_is_tight():
    """The comparison itself: a single coordinate off by 3e-4 fails, in any tensor."""
    import torch

    ref = {"embedding.word_embeddings.weight": torch.zeros(10, 4), "output_layer.weight": torch.zeros(10, 4)}
    assert_weights_match("ok", ref, ref)
    for name in ref:
        one_off = {k: v.clone() for k, v in ref.items()}
        one_off[name][3, 1] = 3e-4
        with pytest.raises(AssertionError, match=f"{name}: 1 coordinates"):
            assert_weights_match("x", one_off, ref)


def test_sft_batches_are_shorter_than_seq_len(runs):
    """The SFT reference (hence, by the equal losses above, every SFT layout) pads each step to
    its own batch's longest example: here to fewer than data.seq_len=32 tokens on some steps,
    so fewer tokens are processed, and not to one fixed length."""
    lengths = json.loads((runs / "reference_sft" / "lengths.json").read_text())
    assert len(lengths) == 4 and min(lengths) < 32 and len(set(lengths)) > 1 and all(n % 8 == 0 for n in lengths), lengths


def test_reference_weights_moved(runs):
    """Sanity: the compared runs actually trained (weights differ from initialisation)."""
    from dlm_megatron.model import sharding

    ref = load_file(str(runs / "reference" / "params.safetensors"))
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    init = sharding.init_full(name, tuple(ref[name].shape), seed=1234, std=0.02, num_layers=2)
    assert (ref[name] - init).abs().max().item() > 1e-3


def test_tp2_loss_and_grads_equal_tp1(tmp_path):
    out = tmp_path / "tp.json"
    torchrun(2, "tests/distributed/check_tp.py", str(out))
    r = json.loads(out.read_text())
    assert r["loss_tp2"] == pytest.approx(r["loss_tp1"], abs=1e-5)
    assert r["max_grad_diff"] < 1e-5, r
    assert r["max_grad"] > 1e-3  # gradients are not trivially zero


@pytest.mark.parametrize("objective", ["uniform", "hybrid"])
def test_tp2_loss_and_grads_equal_tp1_vocab_parallel_objectives(tmp_path, objective):
    """Uniform / hybrid: the ELBO integrand's vocabulary sums run over vocab-parallel logits."""
    out = tmp_path / "tp.json"
    torchrun(2, "tests/distributed/check_tp.py", str(out), objective)
    r = json.loads(out.read_text())
    assert r["loss_tp2"] == pytest.approx(r["loss_tp1"], abs=1e-5)
    assert r["max_grad_diff"] < 1e-6 and r["max_grad"] > 1e-3, r


def test_vocab_parallel_elbo_with_mask_and_padding_columns(tmp_path):
    """Toy vocabulary split over 2 ranks with MASK in rank 0's slice and padding in rank 1's:
    integrand and gradient equal the full-vocabulary path in float64; padding gets no gradient."""
    out = tmp_path / "vp.json"
    torchrun(2, "tests/distributed/check_vocab_parallel.py", str(out))
    for p_u, r in json.loads(out.read_text()).items():
        assert r["f"] < 1e-12 and r["grad"] < 1e-12 and r["max_grad"] > 0.1 and r["pad_grad"] == 0, (p_u, r)


def test_tp2_equals_tp1_with_qkv_bias_and_gqa(tmp_path):
    """Qwen2-style q/k/v biases (nonzero, see check_tp.py) split over TP ranks with the
    weights' group-major layout: same loss and gradients, biases' included."""
    out = tmp_path / "tp_bias.json"
    torchrun(2, "tests/distributed/check_tp.py", str(out), "masked", "model.add_qkv_bias=true", "model.num_query_groups=2")
    r = json.loads(out.read_text())
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in r["params"]
    assert r["loss_tp2"] == pytest.approx(r["loss_tp1"], abs=1e-5)
    assert r["max_grad_diff"] < 1e-5, r


def test_sdpa_equals_dense_attention_at_tp1_and_tp2(tmp_path):
    """model.attention_backend=sdpa (torch SDPA) against megatron-core's dense attention, at
    TP 1 and 2: bidirectional (masked), causal (AR), the 2L boolean mask (block) and per-sample
    [B, 1, S, S] document masks (masked and AR), loss and every gradient (fp32)."""
    out = tmp_path / "att.json"
    torchrun(2, "tests/distributed/check_attention.py", str(out))
    res = json.loads(out.read_text())
    assert sorted(res) == ["ar", "ar_document_masks", "block", "masked", "masked_document_masks"]
    for case, r in res.items():
        for variant, loss in r["loss"].items():
            assert loss == pytest.approx(r["loss"]["dense_tp1"], abs=1e-5), (case, variant)
            assert r["max_grad_diff"][variant] < 1e-5, (case, variant, r)
        assert r["max_grad"] > 1e-2, (case, r)
        if case.endswith("document_masks"):  # the masks change the loss by far more than the tolerance
            assert abs(r["loss_unmasked"] - r["loss"]["dense_tp1"]) > 1e-3, (case, r)


def test_bf16_is_bf16_on_every_engine(tmp_path):
    """train.precision=bf16 on DeepSpeed ZeRO 0-3 (dp2) and the megatron engine (pp2, dp2):
    the linear layers compute in bf16 (bf16 parameters, except ZeRO-0's autocast over fp32
    weights), megatron's TransformerConfig says bf16 where the weights are bf16, AdamW steps
    fp32 master weights with fp32 moments, gradients accumulate in fp32 and are reduced in fp32
    (the dtypes of the reductions that ran), the first-step loss is within 1% of fp32 but not
    equal to it, and 20 steps learn.

    Where the data-parallel gradient reduction runs, measured (check_bf16.py logs every
    reduction and whether backward was running): DeepSpeed ZeRO-2/3 and megatron-core launch
    it from gradient hooks during backward; DeepSpeed ZeRO-0, and ZeRO-1 in bf16 (its
    BF16_Optimizer has no overlap_comm), all-reduce every gradient once per step after the
    last micro-batch's backward, not overlapped. ZeRO-1 in fp32 (DeepSpeedZeroOptimizer) overlaps."""
    out = tmp_path / "bf16.json"
    torchrun(2, "tests/distributed/check_bf16.py", str(out))
    res = json.loads(out.read_text())
    assert len(res) == 6
    for name, r in res.items():
        assert r["outputs"] == ["torch.bfloat16"], (name, r)
        assert r["params"] == (["torch.float32"] if name == "deepspeed_zero0_dp2" else ["torch.bfloat16"]), (name, r)
        assert r["tcfg_bf16"] == (name != "deepspeed_zero0_dp2"), (name, r)  # megatron's softmax then runs in fp32
        assert r["adam_params"] == ["torch.float32"] and r["adam_moments"] == ["torch.float32"], (name, r)
        first = r["losses_bf16"][0]
        assert first != r["first_fp32"] and abs(first - r["first_fp32"]) < 1e-2 * r["first_fp32"], (name, first, r["first_fp32"])
        losses = r["losses_bf16"]
        assert len(losses) == 20 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0, (name, losses)
        red, n = r["reductions"], r["local_params"]
        assert red["dtypes"] == ["torch.float32"], (name, red)
        if name.startswith("megatron"):
            assert r["optimizer"] == ["DistributedOptimizer"] and r["grad_buffers"] == ["torch.float32"] and r["master"] == ["torch.float32"], r
            assert r["overlap"] == {"grad_reduce": True, "param_gather": True, "forward_hooks": True}, (name, r)
            # megatron-core's first step learns which gradients arrive and reduces after backward;
            # from then on each bucket's reduce-scatter is launched by its last gradient hook
            assert 0 < red["after_backward"] <= n and red["in_backward"] == 19 * red["after_backward"], (name, red, n)
        else:
            assert r["communication"] == "torch.float32" and r["grad_accum"] == "torch.float32", (name, r)
            if name in ("deepspeed_zero0_dp2", "deepspeed_zero1_dp2"):
                # one all-reduce of every gradient per step, after backward (not overlapped)
                assert red["in_backward"] == 0 and red["after_backward"] == 20 * n, (name, red, n)
                assert r["side_stream"] is None, (name, r)  # BF16_Optimizer and AdamW have no overlap_comm
            else:
                # every micro-batch is reduced; all buckets but the last are launched from the hooks
                # during backward, the last one (at most a bucket, or one parameter larger than it) after
                total = 20 * r["gas"] * n
                assert r["side_stream"] is True, (name, r)  # on a GPU the launched reduction runs beside backward
                assert red["in_backward"] + red["after_backward"] == total, (name, red, total)
                assert red["after_backward"] <= 20 * r["gas"] * max(r["reduce_bucket_size"], r["largest_param"]) < total, (name, red, r)
    assert res["deepspeed_zero0_dp2"]["autocast"] and res["deepspeed_zero1_dp2"]["optimizer"] == "BF16_Optimizer"
    assert res["deepspeed_zero2_dp2"]["optimizer"] == "DeepSpeedZeroOptimizer"
    assert res["deepspeed_zero3_dp2"]["optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
    # ZeRO-1 overlaps in fp32, where DeepSpeed builds its ZeRO optimizer instead of BF16_Optimizer
    fp32_z1 = res["deepspeed_zero1_dp2"]["fp32"]
    assert fp32_z1["optimizer"] == "DeepSpeedZeroOptimizer" and fp32_z1["side_stream"] is True, fp32_z1
    assert fp32_z1["reductions"]["in_backward"] > 0, fp32_z1
    # Six independent implementations of bf16 mixed precision (autocast, BF16_Optimizer, ZeRO-2/3,
    # megatron's distributed optimizer at pp2 and dp2) agree step by step to bf16 rounding; a
    # lost micro-batch or a bf16 accumulation would move one of them by far more.
    for step in range(20):
        vals = [r["losses_bf16"][step] for r in res.values()]
        assert max(vals) - min(vals) < 5e-3, (step, vals)
