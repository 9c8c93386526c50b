"""SFT through the command line: data.sft_path trains on prompt/response JSONL with falling loss."""
import json
import random

import pytest

from common import COMMON_OVERRIDES, PY, env, metrics, run, train_losses

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
    overrides = [*COMMON_OVERRIDES, f"data.sft_path={data}", f"data.sft_val_path={data}", "data.seq_len=64", "train.steps=20",
                 "train.eval_interval=10", "diffusion.antithetic=true", f"train.output_dir={out}"]
    # DLM_PEAK_TFLOPS gives the CPU run an MFU column (1 TFLOP/s), so the FLOPs it counts show
    run([PY, "-m", "dlm_megatron.train", "configs/tiny.yaml", *overrides], env={**env(), "DLM_PEAK_TFLOPS": "1"})
    # Variable length: MFU counts each step's FLOPs at that step's padded length (a multiple
    # of 8 up to seq_len), not at data.seq_len.
    from dlm_megatron.config import load_config
    from dlm_megatron.train import flops_per_token

    cfg = load_config("configs/tiny.yaml", overrides)
    vocab = json.loads(next((out / "checkpoints").glob("step_*/meta.json")).read_text())["vocab_size"]
    at = {w: flops_per_token(cfg, vocab, w, on_gpu=False) for w in range(8, 65, 8)}
    widths = []
    for r in (r for r in metrics(out) if r.get("split") != "val"):
        per_token = r["mfu"] * 1e12 / r["tokens_per_sec"]
        widths.append(min(at, key=lambda w: abs(at[w] - per_token)))
        assert per_token == pytest.approx(at[widths[-1]], rel=1e-6), (r, at)
    assert max(widths) < 64 and len(widths) == 20, widths  # these examples are much shorter than 64
    losses = train_losses(out)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, f"SFT loss did not fall: {first:.3f} -> {last:.3f}"
    val = [r for r in metrics(out) if r.get("split") == "val"]
    assert len(val) == 2 and val[1]["loss"] < val[0]["loss"]


def test_sft_needs_masked_objective(tmp_path):
    p = run([PY, "-m", "dlm_megatron.train", "configs/tiny.yaml", *COMMON_OVERRIDES, f"data.sft_path={tmp_path}/x.jsonl",
             "diffusion.objective=uniform", f"train.output_dir={tmp_path}/r"], check=False)
    assert p.returncode == 2 and "data.sft_path" in p.stderr
