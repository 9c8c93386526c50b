"""The megatron engine's checkpoints (pp > 1, ep > 1, sequence parallel, MoE): the optimizer
state is saved per parameter fragment under canonical names, the project's own format
(engine/megatron_state.py, engine/zero_state.py), with no collective in the save; a run
resumes at another DP size, and an MoE run at another EP size, and continues as if
uninterrupted.

- DP (and EP) changes: 2 steps at one layout (stopping as if preempted), 2 more at another,
  in separate launches; the 4 per-step losses and final weights must match plain
  single-process AdamW (tests/distributed/reference.py) as every uninterrupted layout does.
- Same layout (bf16 DP2, tied embeddings at PP2, MoE EP2 at zero_stage=0): stopped and
  resumed, the run continues bit for bit like its uninterrupted twin.
- Saves run with every torch.distributed collective raising (save_hooks.copy_only).
- Reads: a rank resuming ZeRO-1 state at dp=2 reads about half of it.
- Checkpoints in megatron-core's own format (written before; save_hooks.legacy) still resume
  at another DP size, and are refused in one line at another EP size.
"""
import json
import re
import shutil

import pytest
from safetensors.torch import load_file

from common import COMMON_OVERRIDES, PY, run, torchrun, train_losses
from test_layouts import COMPARE, _final_params, assert_weights_match

pytestmark = pytest.mark.distributed

MEG = "parallel.engine=megatron"
# 4 experts of 96 SwiGLU units, top-2 (as tests/distributed/test_moe.py)
MOE = ("model.num_moe_experts=4,model.moe_router_topk=2,model.moe_ffn_hidden_size=96,model.qk_layernorm=true,"
       "model.moe_router_pre_softmax=true,model.moe_aux_loss_coeff=0.05")
Z1, Z0 = f"{MEG},parallel.zero_stage=1", f"{MEG},parallel.zero_stage=0"
# Tied embeddings: the one large parameter straddles the DP2 partition boundary, so fragments
# start mid-parameter (without it every parameter of this model falls to one rank whole)
Z1T = f"{Z1},model.tie_embeddings=true"
# name: (reference, settings saved with, processes, settings resumed with, processes)
CHANGED = {
    "zero1_dp1_to_dp2": ("ref_tied", Z1T, 1, Z1T, 2),
    "zero0_dp1_to_dp2": ("ref", Z0, 1, Z0, 2),
    "zero1_dp2_to_dp1": ("ref_tied", Z1T, 2, Z1T, 1),
    "zero0_dp2_to_dp1": ("ref", Z0, 2, Z0, 1),
    # experts: EP2 (each rank steps its 2 experts whole) -> one rank with all 4
    "moe_ep2_to_ep1": ("ref_moe", f"{MOE},{Z1},parallel.ep=2", 2, f"{MOE},{Z1}", 1),
    # experts sharded over the expert-data-parallel group of 2 -> EP2
    "moe_dp2_to_ep2": ("ref_moe", f"{MOE},{Z1}", 2, f"{MOE},{Z1},parallel.ep=2", 2),
    # megatron-core's own format, written before the project's: resumes at another DP size
    "legacy_dp1_to_dp2": ("ref", Z1, 1, Z1, 2),
}
# name: settings (2 processes), stopped after step 2 and resumed; twin "{name}_ref" uninterrupted
SAME = {
    "bf16_dp2_zero1": f"{Z1},train.precision=bf16",
    "tied_pp2": "model.tie_embeddings=true,parallel.pp=2,parallel.zero_stage=1",
    "moe_ep2_zero0": f"{MOE},{Z0},parallel.ep=2",
}
REFERENCES = {"ref": "", "ref_tied": "model.tie_embeddings=true", "ref_moe": MOE}
# Tolerances as in test_resume_dp.py (dense) and test_moe.py (MoE: loss 1e-5, weights 5e-5)
LOSS_TOL = {"ref": 2e-5, "ref_tied": 2e-5, "ref_moe": 1e-5}
MOE_TOL = 5e-5


def _spec(name, settings, *flags):
    return ",".join([f"{name}:{settings}", *COMPARE, *flags])


def _hook(name):
    return "@hook=legacy" if name.startswith("legacy") else "@hook=copy_only"


def _launch(nproc, root, specs):
    args = ["tests/distributed/run_layouts.py", str(root), *specs]
    return (run([PY, *args]) if nproc == 1 else torchrun(nproc, *args)).stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_megatron")
    for name, settings in REFERENCES.items():
        run([PY, "tests/distributed/reference.py", str(root / name), *[s for s in settings.split(",") if s], *COMPARE])
    first = {n: [_spec(k, s, _hook(k), "@stop=2") for k, (_, s, np_, _, _) in CHANGED.items() if np_ == n] for n in (1, 2)}
    then = {n: [_spec(k, s, "@hook=copy_only") for k, (_, _, _, s, np_) in CHANGED.items() if np_ == n] for n in (1, 2)}
    same = [x for k, s in SAME.items()
            for x in (_spec(f"{k}_ref", s, "@hook=copy_only"), _spec(k, s, "@hook=copy_only", "@stop=2"), _spec(k, s, "@hook=copy_only"))]
    out = {}
    _launch(1, root, first[1])
    out[2] = _launch(2, root, first[2] + then[2] + same)
    out[1] = _launch(1, root, then[1])
    return root, out


@pytest.mark.parametrize("name", list(CHANGED))
def test_resumed_at_another_layout_matches_plain_adamw(runs, name):
    root, _ = runs
    refname = CHANGED[name][0]
    ref = json.loads((root / refname / "losses.json").read_text())
    losses = train_losses(root / name)
    assert len(losses) == 4, losses
    for step, (a, b) in enumerate(zip(losses, ref), 1):
        assert a == pytest.approx(b, abs=LOSS_TOL[refname]), f"{name}: step {step} loss {a} != reference {b}"
    got, want = _final_params(root / name), load_file(str(root / refname / "params.safetensors"))
    assert set(got) == set(want)
    if refname != "ref_moe":
        assert_weights_match(name, got, want)
    else:
        assert all((got[k] - want[k]).abs().max().item() <= MOE_TOL for k in want), name


@pytest.mark.parametrize("name", list(SAME))
def test_resumed_at_the_same_layout_continues_bit_for_bit(runs, name):
    import torch

    root, _ = runs
    resumed, uninterrupted = train_losses(root / name), train_losses(root / f"{name}_ref")
    assert len(resumed) == 4 and resumed == uninterrupted, (resumed, uninterrupted)
    got, want = _final_params(root / name), _final_params(root / f"{name}_ref")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_checkpoints_hold_fragments_per_writing_rank(runs):
    """One file per rank that holds state; at zero_stage=0 only the first rank of each replica
    set writes (EP2: each expert-parallel rank its own experts, rank 0 the dense weights)."""
    root, _ = runs

    def files(name, step=2):
        return sorted(p.name for p in (root / name / "checkpoints" / f"step_{step:06d}" / "optim").iterdir())

    assert files("zero1_dp2_to_dp1") == ["tp0_pp0_dp0.safetensors", "tp0_pp0_dp1.safetensors"]
    dp = [load_file(str(root / "zero1_dp2_to_dp1" / "checkpoints" / "step_000002" / "optim" / f"tp0_pp0_dp{d}.safetensors"))
          for d in (0, 1)]
    emb = [sorted(int(k.split("|")[2]) for k in t if k.startswith("embedding.word_embeddings.weight|exp_avg|")) for t in dp]
    assert emb[0] == [0] and emb[1] == [dp[0]["embedding.word_embeddings.weight|exp_avg|0"].numel()]  # split mid-parameter
    assert files("zero0_dp2_to_dp1") == ["tp0_pp0_dp0.safetensors"]
    assert files("tied_pp2") == ["tp0_pp0_dp0.safetensors", "tp0_pp1_dp0.safetensors"]
    assert files("moe_ep2_zero0") == ["tp0_pp0_dp0.safetensors", "tp0_pp0_dp1.safetensors"]
    ck = root / "moe_ep2_zero0" / "checkpoints" / "step_000002" / "optim"
    ep1 = {k.split("|")[0] for k in load_file(str(ck / "tp0_pp0_dp1.safetensors"))}
    assert ep1 and all(".local_experts.2." in k or ".local_experts.3." in k for k in ep1), sorted(ep1)
    tied = load_file(str(root / "tied_pp2" / "checkpoints" / "step_000002" / "optim" / "tp0_pp1_dp0.safetensors"))
    assert "embedding.word_embeddings.weight|exp_avg|0" in tied  # the last stage's copy has state of its own


def test_saves_run_no_collective(runs):
    """Every save of every run above staged its state with torch.distributed's collectives
    raising (save_hooks.copy_only): a save is a host copy of what each rank holds."""
    root, _ = runs
    for name in [*CHANGED, *SAME, *[f"{k}_ref" for k in SAME]]:
        # one line per rank and save: the tensors it staged (0 on a zero_stage=0 replica)
        counts = [int(x) for x in (root / name / "copy_only_saves.txt").read_text().split()]
        assert len(counts) >= 2 and sum(counts) > 0, (name, counts)


def test_each_rank_reads_only_its_partition_of_the_optimizer_state(runs):
    """ZeRO-1 state saved at dp=1, resumed on 2 ranks: the most any rank read of it (counted by
    zero_state.FragmentReader) is about half; at zero_stage=0 (replicated) all of it."""
    root, out = runs
    found = {m.group(3): float(m.group(1)) / float(m.group(2)) for m in re.finditer(
        r"optimizer state: read at most ([\d.]+) MiB per rank of its TP/PP slice's ([\d.]+) MiB \(dp=2, saved at dp=1\)\n"
        r"resumed from (\S+)/checkpoints/", out[2])}
    assert set(found) == {str(root / "zero1_dp1_to_dp2"), str(root / "zero0_dp1_to_dp2")}, found
    assert 0.4 < found[str(root / "zero1_dp1_to_dp2")] <= 0.6 and found[str(root / "zero0_dp1_to_dp2")] == 1.0, found


def test_legacy_checkpoint_is_megatron_cores_format(runs):
    root, _ = runs
    ck = root / "legacy_dp1_to_dp2" / "checkpoints" / "step_000002"
    assert json.loads((ck / "meta.json").read_text())["optimizer"] is None
    assert sorted(p.name for p in (ck / "engine").iterdir()) == ["common_tp0_pp0.pt", "optim_tp0_pp0.pt"]
    assert not (ck / "optim").exists()


def test_legacy_checkpoint_at_another_ep_size_is_refused_in_one_line(runs, tmp_path):
    """megatron-core's own optimizer files are per expert-parallel rank: a checkpoint in that
    format resumes only at the EP size that wrote it (here one whose meta says ep=2)."""
    root, _ = runs
    out = tmp_path / "legacy_ep2"
    shutil.copytree(root / "legacy_dp1_to_dp2", out, ignore=shutil.ignore_patterns("metrics.jsonl"))
    for meta_path in (out / "checkpoints").glob("step_*/meta.json"):
        meta = json.loads(meta_path.read_text())
        meta["layout"]["ep"] = 2
        meta_path.write_text(json.dumps(meta))
    (out / "checkpoints" / "latest").write_text("step_000002\n")
    p = run([PY, "-m", "dlm_megatron.train", "configs/tiny.yaml", *COMMON_OVERRIDES, *Z1.split(","), *COMPARE,
             f"train.output_dir={out}"], check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
    assert "was written at parallel.ep=2 but this run uses parallel.ep=1" in lines[0] and "tools/convert.py reshard" in lines[0]
