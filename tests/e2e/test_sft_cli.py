"""SFT through the command line: data.sft_path trains on prompt/response JSONL with falling loss."""
import json
import random

import pytest

from common import COMMON_OVERRIDES, PY, metrics, run, train_losses

pytestmark = pytest.mark.e2e


def test_sft_cli_trains_with_falling_loss(tmp_path):
    r = random.Random(0)
    words = "king queen sword crown night love death rose".split()
    data = tmp_path / "sft.jsonl"
    with data.open("w") as f:
        for i in range(64):
            w = r.choice(words)
            if i % 2:
                f.write(json.dumps({"prompt": f"Repeat: {w}\n", "response": f"{w} {w} {w}"}) + "\n")
            else:
                f.write(json.dumps({"messages": [{"role": "user", "content": f"Repeat: {w}"},
                                                 {"role": "assistant", "content": f"{w} {w} {w}"}]}) + "\n")
    out = tmp_path / "run"
    run([PY, "-m", "dlm_megatron.train", "configs/tiny.yaml", *COMMON_OVERRIDES, f"data.sft_path={data}", f"data.sft_val_path={data}",
         "data.seq_len=16", "train.steps=20", "train.eval_interval=10", "diffusion.antithetic=true", f"train.output_dir={out}"])
    losses = train_losses(out)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, f"SFT loss did not fall: {first:.3f} -> {last:.3f}"
    val = [r for r in metrics(out) if r.get("split") == "val"]
    assert len(val) == 2 and val[1]["loss"] < val[0]["loss"]


def test_sft_needs_masked_objective(tmp_path):
    p = run([PY, "-m", "dlm_megatron.train", "configs/tiny.yaml", *COMMON_OVERRIDES, f"data.sft_path={tmp_path}/x.jsonl",
             "diffusion.objective=uniform", f"train.output_dir={tmp_path}/r"], check=False)
    assert p.returncode == 2 and "data.sft_path" in p.stderr
