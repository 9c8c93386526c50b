"""The library's trainer against an independent plain-PyTorch reference (reference_plain.py:
masked objective and LR schedule written from their definitions, not imported), for a few
steps of the masked objective. tests/distributed/test_layouts.py compares every layout with
reference.py, which uses the library's objective and schedule; this closes that loop, so a
bug shared by reference.py and the library cannot hide."""
import json

import pytest
from safetensors.torch import load_file

from common import COMMON_OVERRIDES, PY, assert_grad_norms_match, run, train_grad_norms, train_losses

from dlm_megatron.checkpoint import latest_checkpoint, load_full_state_dict

pytestmark = pytest.mark.distributed


def test_trainer_matches_independent_reference(tmp_path):
    run([PY, "tests/distributed/reference_plain.py", str(tmp_path / "plain")])
    run([PY, "-m", "dlm_megatron.train", "configs/tiny.yaml", *COMMON_OVERRIDES, f"train.output_dir={tmp_path / 'lib'}"])
    ref_losses = json.loads((tmp_path / "plain" / "losses.json").read_text())
    losses = train_losses(tmp_path / "lib")
    assert len(losses) == len(ref_losses) == 4
    for step, (a, b) in enumerate(zip(losses, ref_losses), 1):
        assert a == pytest.approx(b, abs=2e-5), f"step {step}: library loss {a} != independent reference {b}"
    # clipping hides the gradient's scale from the weights; the pre-clip norm does not
    assert_grad_norms_match("library", train_grad_norms(tmp_path / "lib"), json.loads((tmp_path / "plain" / "grad_norms.json").read_text()))
    ref = load_file(str(tmp_path / "plain" / "params.safetensors"))
    got = load_full_state_dict(latest_checkpoint(tmp_path / "lib"))
    assert set(got) == set(ref)
    worst = {k: (got[k] - ref[k]).abs().max().item() for k in ref}
    assert max(worst.values()) < 2e-4, sorted(worst.items(), key=lambda kv: -kv[1])[:3]
