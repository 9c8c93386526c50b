"""ZeRO 1/2/3 runs resume at another data-parallel size (a node lost, or added) and continue
exactly: the optimizer state is saved per parameter under canonical names
(engine/zero_state.py), so any DP size reads the ranges its partitions need.

Each run trains 2 steps at one DP size (stopping as if preempted), then 2 more at another,
in separate torchrun launches (one per world size, several runs each); its 4 per-step losses
and final weights must match plain single-process AdamW (tests/distributed/reference.py),
which every uninterrupted layout matches (test_layouts.py). bf16 runs resumed at the same
DP size must continue bit for bit (fp32 masters, not the bf16 weights, are restored).
Reads are counted too: a TP2 rank resuming, and a TP2 x PP2 rank starting from
train.init_from, read at most 0.6 of the model's weights.
"""
import re

import pytest

from common import PY, run, torchrun, train_losses
from test_layouts import COMPARE, _final_params, assert_weights_match

pytestmark = pytest.mark.distributed

STAGES = (1, 2, 3)
TP2 = {f"tp2_dp2_to_tp2_dp1_zero{s}": f"parallel.tp=2,parallel.zero_stage={s}" for s in (1, 3)}
BF16 = {f"bf16_dp2_zero{s}": f"train.precision=bf16,parallel.zero_stage={s}" for s in (1, 3)}


def _launch(nproc, root, specs):
    args = ["tests/distributed/run_layouts.py", str(root), *[",".join((s, *COMPARE)) for s in specs]]
    return run([PY, *args]) if nproc == 1 else torchrun(nproc, *args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_dp")
    run([PY, "tests/distributed/reference.py", str(root / "reference"), *COMPARE])
    out = {}
    _launch(1, root, [f"zero{s}_dp1_to_dp2:parallel.zero_stage={s},@stop=2" for s in STAGES])
    _launch(2, root, [*[f"zero{s}_dp1_to_dp2:parallel.zero_stage={s}" for s in STAGES],
                      *[f"zero{s}_dp2_to_dp1:parallel.zero_stage={s},@stop=2" for s in STAGES],
                      *[f"{k}_ref:{v}" for k, v in BF16.items()],
                      *[f"{k}:{v},@stop=2" for k, v in BF16.items()], *[f"{k}:{v}" for k, v in BF16.items()]])
    out["w4"] = _launch(4, root, [*[f"{k}:{v},@stop=2" for k, v in TP2.items()],
                                  f"tp2_pp2_init_from:parallel.tp=2,parallel.pp=2,parallel.zero_stage=1,train.steps=1,"
                                  f"train.init_from={root}/zero1_dp1_to_dp2"]).stdout
    out["w2"] = _launch(2, root, [f"{k}:{v}" for k, v in TP2.items()]).stdout
    _launch(1, root, [f"zero{s}_dp2_to_dp1:parallel.zero_stage={s}" for s in STAGES])
    return root, out


RESUMED = [f"zero{s}_dp1_to_dp2" for s in STAGES] + [f"zero{s}_dp2_to_dp1" for s in STAGES] + list(TP2)


@pytest.mark.parametrize("name", RESUMED)
def test_resumed_at_another_dp_size_matches_plain_adamw(runs, name):
    import json

    root, _ = runs
    ref = json.loads((root / "reference" / "losses.json").read_text())
    losses = train_losses(root / name)
    assert len(losses) == 4, losses
    for step, (a, b) in enumerate(zip(losses, ref), 1):
        assert a == pytest.approx(b, abs=2e-5), f"{name}: step {step} loss {a} != reference {b}"
    from safetensors.torch import load_file

    assert_weights_match(name, _final_params(root / name), load_file(str(root / "reference" / "params.safetensors")))


@pytest.mark.parametrize("name", list(BF16))
def test_bf16_resume_restores_fp32_masters_bit_for_bit(runs, name):
    root, _ = runs
    resumed, uninterrupted = train_losses(root / name), train_losses(root / f"{name}_ref")
    assert len(resumed) == len(uninterrupted) == 4
    assert resumed == uninterrupted, (resumed, uninterrupted)


def test_tp2_ranks_read_at_most_0_6_of_the_weights(runs):
    """Resume at TP2 (weights + optimizer state) and train.init_from at TP2 x PP2: the most
    any rank read, counted by checkpoint.ShardReader, is at most 0.6 of the model."""
    _, out = runs
    fractions = {}
    for launch in ("w4", "w2"):
        for m in re.finditer(r"weights: read at most [\d.]+ MiB per rank of the model's [\d.]+ MiB \(([\d.]+)\) from (\S+)", out[launch]):
            fractions[(launch, m.group(2))] = float(m.group(1))
    assert len(fractions) == 1 + len(TP2), fractions  # one init_from (w4), the TP2 resumes (w2)
    assert all(0.2 < f <= 0.6 for f in fractions.values()), fractions
