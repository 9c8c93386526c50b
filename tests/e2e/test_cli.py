"""End to end through the command line, as a user runs it."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from common import COMMON_OVERRIDES, PY, REPO, env, metrics, run, train_losses

from dlm_megatron.checkpoint import load_full_state_dict

pytestmark = pytest.mark.e2e

TRAIN = [PY, "-m", "dlm_megatron.train", "configs/tiny.yaml"]
CACHE = f"data.cache_dir={REPO}/.cache/data"


def test_tiny_run_learns_checkpoints_and_logs_to_wandb(tmp_path):
    """~30 steps of the real tiny config: loss falls, checkpoint + metrics + W&B offline files."""
    out = tmp_path / "run"
    p = run(TRAIN + ["train.steps=30", "train.save_interval=15", "train.eval_interval=15", "logging.log_interval=1",
                     "logging.wandb=offline", "train.sample_at_end=true", "generate.gen_length=16", "generate.steps=16",
                     "generate.block_length=16", f"train.output_dir={out}", CACHE], timeout=900)
    rows = metrics(out)
    train = [r for r in rows if r.get("split") != "val"]
    val = [r for r in rows if r.get("split") == "val"]
    assert [r["step"] for r in train] == list(range(1, 31))
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_sec"):
        assert all(key in r for r in train)
    first, last = sum(r["loss"] for r in train[:5]) / 5, sum(r["loss"] for r in train[-5:]) / 5
    assert last < first - 1.0, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert len(val) == 2 and val[1]["loss"] < val[0]["loss"]
    assert (out / "config.yaml").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000030"
    assert (out / "checkpoints" / "step_000015" / "meta.json").is_file()
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb")), "no offline W&B run files"
    assert "---- sample ----" in p.stdout


def test_sigkill_then_rerun_matches_uninterrupted(tmp_path):
    """Kill -9 after the first checkpoint; rerunning the same command ends where an
    uninterrupted run ends (loss and weights)."""
    common = TRAIN + list(COMMON_OVERRIDES) + ["train.steps=12", "train.save_interval=4"]
    ref = tmp_path / "ref"
    run(common + [f"train.output_dir={ref}"])

    out = tmp_path / "killed"
    cmd = common + [f"train.output_dir={out}", "train.steps=12"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoints" / "latest").is_file():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = (out / "checkpoints" / "latest").read_text().strip()
    assert killed_at != "step_000012", "the run finished before it could be killed; make it longer"
    p = run(cmd)
    assert "resumed from" in p.stdout
    assert train_losses(out)[-1] == pytest.approx(train_losses(ref)[-1], abs=1e-6)
    a = load_full_state_dict(ref / "checkpoints" / "step_000012")
    b = load_full_state_dict(out / "checkpoints" / "step_000012")
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "run"
    run(TRAIN + list(COMMON_OVERRIDES) + ["train.steps=3", f"train.output_dir={out}"])
    return out


def test_generate_prints_text(small_run):
    p = run([PY, "-m", "dlm_megatron.generate", "--ckpt", str(small_run), "--prompt", "ROMEO:", "--gen-length", "16", "--steps", "8", "--block-length", "8"])
    lines = [l for l in p.stdout.splitlines() if l.strip()]
    assert lines and lines[0].startswith("ROMEO:")
    # a checkpoint folder works as well as a run directory, and the result is deterministic
    q = run([PY, "-m", "dlm_megatron.generate", "--ckpt", str(small_run / "checkpoints" / "step_000003"), "--prompt", "ROMEO:",
             "--gen-length", "16", "--steps", "8", "--block-length", "8"])
    assert q.stdout == p.stdout


GENERATE_FLAGS = ("--steps", "--temperature", "--temperature-schedule", "--acceptance-profile", "--renoise-profile",
                  "--renoise-eta", "--renoise-t-on", "--renoise-t-off", "--renoise-alpha-on", "--renoise-prob", "--cache",
                  "--parallel-threshold", "--confidence-threshold", "--cfg-scale", "--stop-at-eos", "--remasking",
                  "--gen-length", "--block-length", "--seed")


def test_generate_knobs_reach_the_sampler_and_defaults_are_unchanged(small_run, monkeypatch, capsys):
    """Every sampler flag lands in the SamplerConfig the sampler runs with (in-process main(),
    the sampler spied on); without flags the text is the pre-issue-14 sampler's (frozen copy);
    the generate.* config keys of the same names are the defaults."""
    import sys as _sys

    _sys.path.insert(0, str(Path(REPO) / "tests" / "unit"))
    import legacy_masked_sampler as legacy

    from dlm_megatron import generate as gen_mod
    from dlm_megatron import sampling

    base = ["--ckpt", str(small_run), "--prompt", "ROMEO:", "--gen-length", "16", "--steps", "16", "--block-length", "8"]
    assert gen_mod.main(base) == 0
    plain = capsys.readouterr().out
    model, tok, cfg, _ = gen_mod.load_model(str(small_run))
    ids = tok.encode("ROMEO:")
    want = legacy.generate(gen_mod.logits_fn_for(model, tok.vocab_size), torch.tensor([ids]), tok.mask_id,
                           legacy.SamplerConfig(steps=16, gen_length=16, block_length=8, temperature=cfg.generate.temperature,
                                                remasking=cfg.generate.remasking, seed=cfg.generate.seed), eos_id=tok.eot_id,
                           suppress_ids=(tok.pad_id,))[0, len(ids):].tolist()
    want = want[: want.index(tok.eot_id)] if tok.eot_id in want else want
    assert plain.strip() == tok.decode(ids + want).strip()

    seen = []
    real = sampling.generate
    monkeypatch.setattr(sampling, "generate", lambda fn, x, m, scfg, **kw: seen.append(scfg) or real(fn, x, m, scfg, **kw))
    flags = ["--temperature", "0.7", "--temperature-schedule", "cosine", "--acceptance-profile", "cosine",
             "--renoise-profile", "loop", "--renoise-eta", "0.1", "--renoise-t-on", "0.6", "--renoise-t-off", "0.1",
             "--renoise-alpha-on", "0.8", "--cache", "dual", "--cfg-scale", "0.5", "--stop-at-eos", "--remasking", "margin",
             "--seed", "4"]
    assert gen_mod.main(base + flags) == 0
    s = seen[-1]
    assert (s.temperature, s.temperature_schedule, s.acceptance_profile, s.renoise_profile, s.renoise_eta, s.renoise_t_on,
            s.renoise_t_off, s.renoise_alpha_on, s.cache, s.cfg_scale, s.stop_at_eos, s.remasking, s.seed) == (
        0.7, "cosine", "cosine", "loop", 0.1, 0.6, 0.1, 0.8, "dual", 0.5, True, "margin", 4)
    assert gen_mod.main(base + ["--parallel-threshold", "0.8", "--cache", "prefix"]) == 0
    assert (seen[-1].parallel_threshold, seen[-1].cache) == (0.8, "prefix")
    assert gen_mod.main(base + ["--renoise-prob", "0.2", "--confidence-threshold", "0.5"]) == 0
    assert (seen[-1].renoise, seen[-1].confidence_threshold) == (("constant", 0.2), 0.5)
    # config keys are the defaults
    cfg.generate.acceptance_profile, cfg.generate.cache, cfg.generate.cfg_scale = "cosine", "prefix", 2.0
    gen_mod.sample_text(model, tok, cfg, device="cpu", prompt="ROMEO:", gen_length=16, steps=16, block_length=8)
    assert (seen[-1].acceptance_profile, seen[-1].cache, seen[-1].cfg_scale) == ("cosine", "prefix", 2.0)
    capsys.readouterr()


def test_generate_help_and_bad_knobs_are_one_line(small_run, tmp_path):
    h = run([PY, "-m", "dlm_megatron.generate", "--help"]).stdout
    for flag in GENERATE_FLAGS:
        assert flag in h, flag
    base = [PY, "-m", "dlm_megatron.generate", "--ckpt", str(small_run), "--prompt", "x", "--gen-length", "8", "--steps", "8",
            "--block-length", "8"]
    for bad, needle in ((["--cache", "full"], "--cache"), (["--renoise-eta", "1.5", "--renoise-profile", "cap"], "--renoise-eta"),
                        (["--parallel-threshold", "0.9", "--renoise-profile", "constant"], "--parallel-threshold"),
                        (["--acceptance-profile", "square"], "--acceptance-profile"), (["--cfg-scale", "-1"], "--cfg-scale"),
                        (["--renoise-profile", "loop", "--renoise-t-on", "0.1", "--renoise-t-off", "0.5"], "--renoise-t-off")):
        p = run(base + bad, check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (bad, p.stderr)
    # a real run with Fast-dLLM's dual cache + threshold, guidance and stop-at-EOS prints a completion
    p = run(base + ["--cache", "dual", "--parallel-threshold", "0.9", "--cfg-scale", "1", "--stop-at-eos"])
    assert p.stdout.startswith("x")


def test_missing_checkpoint_is_one_line(tmp_path):
    p = run([PY, "-m", "dlm_megatron.generate", "--ckpt", str(tmp_path / "nope"), "--prompt", "x"], check=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"error: checkpoint path '{tmp_path / 'nope'}' does not exist (pass a run directory or a checkpoints/step_* folder)"]


def test_nan_loss_and_nan_gradient_are_skipped_then_stop_without_touching_checkpoint(tmp_path):
    """ZeRO-0, one process: a NaN loss (step 2) and a finite loss with a NaN gradient (step 7,
    the last) are each skipped with a warning; the weights after the skipped last step equal
    the checkpoint before it. Three bad steps in a row stop the run, last checkpoint intact.
    (Other engines and layouts: tests/distributed/test_nonfinite.py.)"""
    out = tmp_path / "nan"
    base = TRAIN + list(COMMON_OVERRIDES) + ["train.save_interval=1", "train.keep_last=20", "train.steps=8", "train.max_bad_steps=3"]
    p = run(base + [f"train.output_dir={out}"], env=env(DLM_TEST_INJECT_NAN_STEPS="2", DLM_TEST_INJECT_NAN_GRAD_STEPS="7"))
    for s in (2, 7):
        assert f"non-finite loss or gradient at step {s}; update skipped" in p.stdout, p.stdout
    rows = [r for r in metrics(out) if r.get("split") != "val"]
    assert [r["step"] for r in rows] == [1, 2, 4, 5, 6, 7]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in rows)
    a = load_full_state_dict(out / "checkpoints" / "step_000007")
    b = load_full_state_dict(out / "checkpoints" / "step_000008")  # saved at the end, after the skipped step
    assert all(torch.equal(a[k], b[k]) and torch.isfinite(b[k]).all() for k in a)
    # three in a row (NaN gradients, finite losses): clear stop, exit 2, the last good checkpoint is intact
    out2 = tmp_path / "nan2"
    p = run(base + [f"train.output_dir={out2}"], env=env(DLM_TEST_INJECT_NAN_GRAD_STEPS="4,5,6"), check=False)
    assert p.returncode == 2
    assert "stopping: 3 non-finite steps (loss or gradient) in a row" in p.stderr
    assert (out2 / "checkpoints" / "latest").read_text().strip() == "step_000004"
    sd = load_full_state_dict(out2 / "checkpoints" / "step_000004")
    assert all(torch.isfinite(v).all() for v in sd.values())


def test_corrupt_shard_and_wrong_tokenizer_are_one_line(tmp_path):
    """Bad training data stops with one line that names the file and the cause: shards made
    with another tokenizer, a truncated .bin, an .idx with a bad header. Content corruption
    that keeps sizes and headers intact is what `tools/shard.py --verify` finds (sha256)."""
    import shutil

    src = tmp_path / "a.txt"
    src.write_text("To be, or not to be, that is the question. " * 200)
    data = tmp_path / "shards"
    shard_cmd = [PY, "tools/shard.py", "--input", str(src), "--format", "megatron", "--workers", "1", "--no-progress"]
    run(shard_cmd + ["--tokenizer", "builtin", "--output", str(data)])
    ok = run([PY, "tools/shard.py", "--verify", str(data)])
    assert "OK" in ok.stdout and "sha256-verified" in ok.stdout

    def train(d, tokenizer="builtin"):
        return run(TRAIN + list(COMMON_OVERRIDES) + [f"data.train_path={d}", "data.val_path=null", f"data.tokenizer={tokenizer}",
                                                     f"train.output_dir={tmp_path / ('run_' + d.name + '_' + Path(tokenizer).stem)}",
                                                     "train.steps=1"], check=False)

    def one_line(p, *needles, code=2):
        lines = p.stderr.strip().splitlines()
        assert p.returncode == code and len(lines) == 1, p.stderr[-3000:]
        for n in needles:
            assert n in lines[0], (n, lines[0])

    assert train(data).returncode == 0
    # another tokenizer: the same BPE with one merge dropped (other ids, other sha256)
    from dlm_megatron.data.tokenizer import load_tokenizer

    tok_json = json.loads(Path(load_tokenizer("builtin").path).read_text())
    tok_json["model"]["merges"] = tok_json["model"]["merges"][:-1]
    other_tok = tmp_path / "other_tokenizer.json"
    other_tok.write_text(json.dumps(tok_json))
    one_line(train(data, other_tok), f"shards in {data} were made with tokenizer sha", "data.tokenizer")
    # truncated token file
    bad = tmp_path / "copy1"
    shutil.copytree(data, bad)
    binf = next(bad.glob("*.bin"))
    binf.write_bytes(binf.read_bytes()[:-10])
    one_line(train(bad), str(binf), "bytes but manifest.json records", "truncated or corrupt")
    # index with a bad header (magic)
    bad = tmp_path / "copy2"
    shutil.copytree(data, bad)
    idxf = next(bad.glob("*.idx"))
    raw = bytearray(idxf.read_bytes())
    raw[0] ^= 0xFF
    idxf.write_bytes(bytes(raw))
    one_line(train(bad), str(idxf), "not a Megatron .idx file (bad magic")
    # a flipped token byte: same size, same header, different content
    bad = tmp_path / "copy3"
    shutil.copytree(data, bad)
    binf = next(bad.glob("*.bin"))
    raw = bytearray(binf.read_bytes())
    raw[10] ^= 0xFF
    binf.write_bytes(bytes(raw))
    one_line(run([PY, "tools/shard.py", "--verify", str(bad)], check=False), str(binf), "does not match its sha256")
    one_line(run([PY, "tools/shard.py", "--verify", str(tmp_path / "nowhere")], check=False), "not a shard directory")


def test_resume_with_incompatible_layout_is_one_line(small_run, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(small_run, run_dir)
    p = run(TRAIN + list(COMMON_OVERRIDES) + ["train.steps=5", "parallel.zero_stage=1", f"train.output_dir={run_dir}"], check=False)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds ZeRO-0 optimizer state but this run uses parallel.zero_stage=1" in lines[0], p.stderr


def test_init_from_starts_from_those_weights(small_run, tmp_path):
    """train.init_from loads another run's weights (any layout) and starts at step 0."""
    out = tmp_path / "init"
    p = run(TRAIN + list(COMMON_OVERRIDES) + ["train.steps=1", "train.lr=1e-12", "train.warmup_steps=0",
                                              f"train.init_from={small_run}", f"train.output_dir={out}"])
    assert "initialised weights from" in p.stdout
    a = load_full_state_dict(small_run / "checkpoints" / "step_000003")
    b = load_full_state_dict(out / "checkpoints" / "step_000001")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-8


def test_activation_recomputation_gives_identical_training(tmp_path):
    """model.recompute=selective|full trades compute for memory without changing the numbers."""
    losses = {}
    for mode in ("none", "selective", "full"):
        out = tmp_path / mode
        run(TRAIN + list(COMMON_OVERRIDES) + ["train.steps=3", f"model.recompute={mode}", f"train.output_dir={out}"])
        losses[mode] = train_losses(out)
    assert losses["selective"] == pytest.approx(losses["none"], abs=1e-6)
    assert losses["full"] == pytest.approx(losses["none"], abs=1e-6)


def test_document_masks_block_attention_across_packed_documents(tmp_path):
    """With data.document_masks=true, packed short documents cannot see each other in
    training, in validation and in dlm_megatron.eval: the same batch gives a different
    training loss, the same (untrained) weights a different validation loss, and the same
    checkpoint a different eval bound than with attention across documents."""
    import shutil

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"Doc {i}: thou art {'fair' if i % 2 else 'foul'} indeed."}) + "\n" for i in range(400)))
    data = tmp_path / "shards"
    run([PY, "tools/shard.py", "--input", str(src), "--field", "text", "--tokenizer", "builtin", "--output", str(data),
         "--format", "megatron", "--workers", "1", "--no-progress"])
    losses, val = {}, {}
    for flag in ("false", "true"):
        out = tmp_path / f"dm_{flag}"
        # lr ~ 0: both runs keep the initial weights, so validation differs only by the masks
        run(TRAIN + list(COMMON_OVERRIDES) + [f"data.train_path={data}", f"data.val_path={data}", "train.steps=1",
                                              "train.lr=1e-12", "train.warmup_steps=0", f"data.document_masks={flag}",
                                              f"train.output_dir={out}"])
        losses[flag] = train_losses(out)[0]
        val[flag] = [r for r in metrics(out) if r.get("split") == "val"][-1]["loss"]
    assert abs(losses["true"] - losses["false"]) > 1e-4, losses
    assert abs(val["true"] - val["false"]) > 1e-4, val
    # eval: the checkpoint trained with masks, and the same weights with the flag turned off
    off = tmp_path / "dm_true_flag_off"
    shutil.copytree(tmp_path / "dm_true" / "checkpoints" / "step_000001", off)
    meta = json.loads((off / "meta.json").read_text())
    meta["config"]["data"]["document_masks"] = False
    (off / "meta.json").write_text(json.dumps(meta))
    bounds = {}
    for name, ck in (("on", tmp_path / "dm_true"), ("off", off)):
        p = run([PY, "-m", "dlm_megatron.eval", "--ckpt", str(ck), "--data", str(src), "--num-samples", "2", "--max-tokens", "256"])
        assert ("document masks" in p.stdout) == (name == "on"), p.stdout
        bounds[name] = float(next(l for l in p.stdout.splitlines() if l.startswith("nll bound")).split(":")[1].split("+-")[0])
    assert abs(bounds["on"] - bounds["off"]) > 1e-3, bounds


def _eval_bound(ckpt, data, k):
    p = run([PY, "-m", "dlm_megatron.eval", "--ckpt", str(ckpt), "--data", str(data), "--num-samples", str(k), "--max-tokens", "512"])
    line = next(l for l in p.stdout.splitlines() if l.startswith("nll bound"))
    nll, se = line.split(":")[1].split("(")[0].split("+-")
    return float(nll), float(se)


def test_eval_trained_bound_below_untrained_and_se_shrinks(small_run, tmp_path):
    """The ELBO bound of a trained checkpoint is lower than an untrained one's, and the
    Monte Carlo standard error shrinks with more samples of t per window."""
    import lzma

    for line in lzma.open(Path(REPO) / "dlm_megatron/assets/corpus/shakespeare.jsonl.xz", "rt"):
        doc = json.loads(line)
        if doc["id"] == "twelfth_night":  # a held-out play
            break
    data = tmp_path / "val.txt"
    data.write_text(doc["text"][:6000])
    untrained = tmp_path / "untrained"
    run(TRAIN + list(COMMON_OVERRIDES) + ["train.steps=1", "train.lr=1e-12", "train.warmup_steps=0", f"train.output_dir={untrained}"])
    trained_nll, se_2 = _eval_bound(small_run, data, 2)
    untrained_nll, _ = _eval_bound(untrained, data, 2)
    assert trained_nll < untrained_nll - 0.3, (trained_nll, untrained_nll)
    _, se_16 = _eval_bound(small_run, data, 16)
    # Only the noise-level part of the variance falls with K (the windows' own spread does
    # not), so expect a clear drop rather than the ideal 1/sqrt(8).
    assert se_16 < 0.85 * se_2, (se_2, se_16)


def test_checkpoint_folder_pruned_cleaned_and_broken_ones_are_one_line(tmp_path):
    """The trainer's checkpoint housekeeping through the CLI: train.keep_last prunes old
    saves; leftovers of an interrupted save are cleaned on the next start (even one with
    nothing left to train); a `latest` naming a missing checkpoint, a truncated optimizer-state
    file and a corrupt model shard are one-line errors (exit 2) naming the pointer or the file."""
    import shutil

    out = tmp_path / "run"
    cmd = TRAIN + list(COMMON_OVERRIDES) + ["train.steps=3", "train.save_interval=1", "train.keep_last=2", f"train.output_dir={out}"]
    run(cmd)
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000002", "step_000003"]
    # leftovers of a save killed midway, found by the next start
    (root / ".tmp-step_000004" / "model").mkdir(parents=True)
    (root / ".latest.tmp").write_text("step_000004\n")
    p = run(cmd)
    assert "cleaned up .tmp-step_000004 left by an interrupted save" in p.stdout, p.stdout
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000002", "step_000003"]

    def one_line_error(args, *needles):
        q = run(args, check=False)
        lines = q.stderr.strip().splitlines()
        assert q.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), q.stderr[-3000:]
        for n in needles:
            assert n in lines[0], (n, lines[0])

    longer = cmd[:-1] + ["train.steps=5", f"train.output_dir={out}"]
    gen = [PY, "-m", "dlm_megatron.generate", "--ckpt", str(out), "--prompt", "x", "--gen-length", "4", "--steps", "4", "--block-length", "4"]
    (root / "latest").write_text("step_000099\n")
    one_line_error(longer, str(root / "latest"), "step_000099")
    one_line_error(gen, str(root / "latest"), "step_000099")
    (root / "latest").write_text("step_000003\n")
    engine_file = next((root / "step_000003" / "optim").glob("*.safetensors"))  # the optimizer state
    saved = engine_file.read_bytes()
    engine_file.write_bytes(saved[: len(saved) // 2])
    one_line_error(longer, str(engine_file), "corrupt")
    engine_file.write_bytes(saved)
    shard = root / "step_000003" / "model" / "tp0_pp0.safetensors"
    shutil.copy(shard, tmp_path / "shard.bak")
    shard.write_bytes(b"\0" * 64)
    one_line_error(gen, str(shard), "corrupt")
    one_line_error(TRAIN + list(COMMON_OVERRIDES) + ["train.steps=1", f"train.init_from={out}", f"train.output_dir={tmp_path / 'init'}"],
                   str(shard), "corrupt")
    shutil.copy(tmp_path / "shard.bak", shard)
    assert "resumed from" in run(longer).stdout  # restored: the run goes on
