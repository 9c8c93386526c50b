"""Uniform / hybrid objectives and the likelihood evaluator through the command line."""
import json
import math
import re

import pytest

from common import COMMON_OVERRIDES, PY, metrics, run, train_losses

pytestmark = pytest.mark.e2e

TRAIN = [PY, "-m", "dlm_megatron.train", "configs/tiny.yaml", *COMMON_OVERRIDES]
EVAL = [PY, "-m", "dlm_megatron.eval"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("objectives")
    out = {}
    for obj, steps in (("uniform", 20), ("hybrid", 20)):
        out[obj] = root / obj
        run(TRAIN + [f"diffusion.objective={obj}", f"train.steps={steps}", "train.eval_interval=10", "diffusion.antithetic=true",
                     f"train.output_dir={out[obj]}"])
    data = root / "val.jsonl"
    from dlm_megatron.data.corpus import load_builtin_documents

    data.write_text("".join(json.dumps({"text": d["text"][:3000]}) + "\n" for d in load_builtin_documents("val")))
    out["data"] = data
    return out


@pytest.mark.parametrize("obj", ["uniform", "hybrid"])
def test_uniform_and_hybrid_train_with_falling_loss_and_bucketed_val(runs, obj):
    losses = train_losses(runs[obj])
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, f"{obj}: loss did not fall: {first:.3f} -> {last:.3f}"
    val = [r for r in metrics(runs[obj]) if r.get("split") == "val"]
    assert len(val) == 2 and val[1]["loss"] < val[0]["loss"]
    buckets = [k for k in val[-1] if k.startswith("loss_t")]
    assert buckets and all(k[6:9] in {f"{j / 10:.1f}" for j in range(10)} for k in buckets)


def test_eval_bound_table_and_choices(runs, tmp_path):
    """One eval call (each costs ~20 s of start-up): bound table + accuracy. Determinism under
    --seed and the AR exact perplexity are checked in tests/unit/test_eval.py with a fake model."""
    ch = tmp_path / "choices.jsonl"
    ch.write_text(json.dumps({"prompt": "ROMEO:", "choices": ["I love thee.", "zz qq"], "answer": 0}) + "\n")
    p = run(EVAL + ["--ckpt", str(runs["uniform"]), "--data", str(runs["data"]), "--max-tokens", "256", "--num-samples", "2",
                    "--seed", "3"])
    lines = p.stdout.strip().splitlines()
    assert lines[-1].startswith("perplexity_bound ") and float(lines[-1].split()[1]) > 1
    # the bound line's nll and its standard error, and the perplexity its exponential
    m = re.match(r"nll bound \(nats/token\): (\S+) \+- (\S+) ", lines[-2])
    assert m and 0 < float(m[1]) < math.log(8192) + 1 and 0 < float(m[2]) < float(m[1]), lines[-2]
    assert float(lines[-1].split()[1]) == pytest.approx(math.exp(float(m[1])), rel=1e-3)
    buckets = [ln for ln in lines if ln.startswith("[0.")]
    rows = [(int(ln.split()[1]), float(ln.split()[2])) for ln in buckets]
    # the buckets hold every sample (windows x K = 2), and a bucket has a loss iff it has samples
    assert len(rows) == 10 and sum(n for n, _ in rows) % 2 == 0 and sum(n for n, _ in rows) > 0, buckets
    assert all((n == 0) == math.isnan(v) and (n == 0 or v >= 0) for n, v in rows), buckets
    ch.write_text(ch.read_text() + json.dumps({"prompt": "JULIET:", "choices": ["zz qq", "O Romeo."], "answer": 1}) + "\n")
    p = run(EVAL + ["--ckpt", str(runs["hybrid"]), "--choices", str(ch), "--num-samples", "2"])
    m = re.fullmatch(r"accuracy (\S+) \((\d+)/(\d+)\)", p.stdout.strip().splitlines()[-1])
    assert m and int(m[3]) == 2 and float(m[1]) == pytest.approx(int(m[2]) / 2), p.stdout


def test_eval_errors_are_one_line_exit_2(runs, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for args in (["--ckpt", str(tmp_path / "nope"), "--data", str(runs["data"])],
                 ["--ckpt", str(runs["hybrid"]), "--data", str(tmp_path / "missing.txt")],
                 ["--ckpt", str(runs["hybrid"]), "--data", str(empty)]):
        p = run(EVAL + args, check=False)
        assert p.returncode == 2 and p.stderr.strip().startswith("error:") and len(p.stderr.strip().splitlines()) == 1, p.stderr
    h = run(EVAL + ["--help"]).stdout
    for flag in ("--ckpt", "--data", "--field", "--choices", "--num-samples", "--batch-size", "--seq-len", "--seed", "--buckets", "--max-tokens"):
        assert flag in h


def test_generate_uniform_prints_text(runs):
    p = run([PY, "-m", "dlm_megatron.generate", "--ckpt", str(runs["hybrid"]), "--prompt", "ROMEO:", "--gen-length", "8",
             "--steps", "4", "--block-length", "8"])
    assert p.stdout.startswith("ROMEO:")
