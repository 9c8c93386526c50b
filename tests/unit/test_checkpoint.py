"""Checkpoint folder mechanics (checkpoint.py) without a model: atomic commit and the
``latest`` pointer, keep_last pruning, cleanup after an interrupted save, and one-line errors
that name the broken pointer or file. The trainer's use of them: tests/e2e/test_cli.py."""
import json

import pytest
import torch
from safetensors.torch import save_file

from dlm_megatron import checkpoint as ckpt


def _save(out, step, keep_last, payload=b"x"):
    tmp = ckpt.begin_save(out, step)
    ckpt.prepare_tmp(tmp)
    (tmp / "model").mkdir()
    (tmp / "model" / "blob").write_bytes(payload)
    return ckpt.commit_save(out, tmp, step, {"layout": {"tp": 1, "pp": 1}}, keep_last)


def _steps(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name == "latest")


def test_commit_moves_latest_and_keep_last_prunes(tmp_path):
    for step in range(1, 6):
        final = _save(tmp_path, step, keep_last=2)
        assert final.name == f"step_{step:06d}" and (final / "meta.json").is_file()
        assert ckpt.latest_checkpoint(tmp_path) == final
        assert _steps(tmp_path) == [f"step_{s:06d}" for s in range(max(1, step - 1), step + 1)]
    meta = json.loads((tmp_path / "checkpoints" / "step_000005" / "meta.json").read_text())
    assert meta["step"] == 5 and meta["format_version"] == ckpt.FORMAT_VERSION
    _save(tmp_path, 6, keep_last=1)
    assert _steps(tmp_path) == ["step_000006"]
    # The checkpoint `latest` names is never pruned, even when it is not among the newest.
    for s in (7, 8):
        _save(tmp_path, s, keep_last=5)
    (tmp_path / "checkpoints" / "latest").write_text("step_000006\n")
    ckpt.prune(tmp_path / "checkpoints", 1)
    assert _steps(tmp_path) == ["step_000006", "step_000008"]


def test_clean_stale_after_an_interrupted_save(tmp_path):
    _save(tmp_path, 1, keep_last=3)
    _save(tmp_path, 2, keep_last=3)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_000003" / "model").mkdir(parents=True)   # killed while writing step 3
    (root / ".latest.tmp").write_text("step_000003\n")           # killed before the pointer moved
    (root / ".trash-step_000002").mkdir()                        # old copy of a re-saved step 2
    (root / "step_000001").rename(root / ".trash-step_000001")   # killed between the two renames
    assert sorted(ckpt.clean_stale(tmp_path)) == [".latest.tmp", ".tmp-step_000003", ".trash-step_000001", ".trash-step_000002"]
    assert _steps(tmp_path) == ["step_000001", "step_000002"]    # step 1 put back, nothing else left
    assert (root / "step_000001" / "model" / "blob").read_bytes() == b"x"
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000002"
    assert ckpt.clean_stale(tmp_path) == [] and ckpt.clean_stale(tmp_path / "nowhere") == []


def test_latest_pointing_at_a_missing_checkpoint_is_one_line(tmp_path):
    _save(tmp_path, 1, keep_last=3)
    (tmp_path / "checkpoints" / "latest").write_text("step_000099\n")
    for call in (lambda: ckpt.latest_checkpoint(tmp_path), lambda: ckpt.resolve(tmp_path),
                 lambda: ckpt.resolve(tmp_path / "checkpoints")):
        with pytest.raises(ckpt.CheckpointError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "latest" in msg and "step_000099" in msg, msg


def test_corrupt_files_are_named(tmp_path):
    final = _save(tmp_path, 1, keep_last=3)
    shard = final / "model" / ckpt.shard_filename(0, 0)
    save_file({"w": torch.ones(4)}, str(shard))
    assert torch.equal(ckpt.load_full_state_dict(final)["w"], torch.ones(4))
    shard.write_bytes(shard.read_bytes()[:20])  # truncated
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_full_state_dict(final)
    assert str(shard) in str(e.value) and "corrupt" in str(e.value) and "\n" not in str(e.value)
    engine = final / "engine" / "engine"
    engine.mkdir(parents=True)
    good = engine / "mp_rank_00_model_states.pt"
    torch.save({"a": torch.ones(3)}, good)
    ckpt.check_torch_files(final / "engine")
    good.write_bytes(good.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.check_torch_files(final / "engine")
    assert str(good) in str(e.value) and "\n" not in str(e.value)


# --- reading only this rank's slice (train.init_from, weights-only resume, PP resume, reshard) ---

def _canonical_model(num_layers=4, h=8, v=16, ffn=16):
    g = torch.Generator().manual_seed(0)
    full = {"embedding.word_embeddings.weight": torch.randn(v, h, generator=g),
            "decoder.final_layernorm.weight": torch.randn(h, generator=g),
            "output_layer.weight": torch.randn(v, h, generator=g)}
    for i in range(num_layers):
        pre = f"decoder.layers.{i}."
        full.update({pre + "input_layernorm.weight": torch.randn(h, generator=g),
                     pre + "self_attention.linear_qkv.weight": torch.randn(3 * h, h, generator=g),
                     pre + "self_attention.linear_proj.weight": torch.randn(h, h, generator=g),
                     pre + "pre_mlp_layernorm.weight": torch.randn(h, generator=g),
                     pre + "mlp.linear_fc1.weight": torch.randn(2 * ffn, h, generator=g),  # SwiGLU [gate; up]
                     pre + "mlp.linear_fc2.weight": torch.randn(h, ffn, generator=g)})
    return full


def _written(tmp_path, full, tp, pp):
    from dlm_megatron.config import Config, to_dict
    from dlm_megatron.convert.reshard import write_layout

    cfg = to_dict(Config())
    cfg["model"].update(num_layers=4, hidden_size=8, num_attention_heads=4, ffn_hidden_size=16)
    cfg["parallel"].update(tp=tp, pp=pp)
    meta = {"config": cfg, "layout": {"tp": tp, "pp": pp, "dp": 1, "zero_stage": 0}, "engine": None, "vocab_size": 16}
    return write_layout(full, meta, tmp_path / f"src_tp{tp}_pp{pp}", step=1, show_progress=False)


@pytest.mark.parametrize("src", [(1, 1), (2, 2), (4, 1)])
def test_shard_reader_reads_only_this_ranks_slice(tmp_path, src):
    """From a checkpoint written at any TP x PP, ShardReader.read(name, t, tp) equals the
    TP slice of the full tensor (SwiGLU's per-rank [gate; up] included), and a rank of a
    TP2 x PP2 (or TP2) layout reads at most 0.6 of the model's bytes (counted in the reader)."""
    from dlm_megatron.convert.reshard import stage_of
    from dlm_megatron.model import sharding

    full = _canonical_model()
    ck = _written(tmp_path, full, *src)
    total = sum(t.numel() * 4 for t in full.values())
    for tp, pp in ((1, 1), (2, 1), (2, 2), (4, 1)):
        for p in range(pp):
            for t in range(tp):
                reader = ckpt.ShardReader(ck)
                assert reader.total_bytes == total
                names = [n for n in full if p in stage_of(n, 4, pp)]
                for n in names:
                    want = sharding.shard(full[n], n, t, tp)
                    assert torch.equal(reader.read(n, t, tp), want), (src, tp, pp, t, p, n)
                assert reader.bytes_read == sum(sharding.shard(full[n], n, t, tp).numel() * 4 for n in names)
                if tp * pp >= 2:
                    assert reader.bytes_read <= 0.6 * total, (src, tp, pp, reader.bytes_read / total)
    assert {ckpt.ShardReader(ck).read(n).shape for n in full} == {t.shape for t in full.values()}
