"""Config tree: presets load, overrides apply, bad input is one clear line."""
import subprocess
import sys

import pytest

from common import REPO

from dlm_megatron.config import ConfigError, describe, load_config

REQUIRED_KEYS = ["train.steps", "train.output_dir", "train.global_batch_size", "train.micro_batch_size", "train.seed",
                 "parallel.tp", "parallel.pp", "parallel.zero_stage", "diffusion.objective", "diffusion.block_size",
                 "model.num_layers", "model.hidden_size", "data.seq_len", "logging.wandb"]


@pytest.mark.parametrize("preset", ["tiny", "125m", "1b", "8b"])
def test_presets_load(preset):
    cfg = load_config(f"configs/{preset}.yaml")
    assert cfg.model.num_layers > 0


def test_8b_is_llada_shape():
    c = load_config("configs/8b.yaml")
    m = c.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_hidden_size, m.vocab_size, c.data.seq_len) == (32, 4096, 32, 12288, 126464, 4096)


def test_contract_keys_exist_and_override():
    vals = {"train.steps": 7, "train.output_dir": "x", "train.global_batch_size": 32, "train.micro_batch_size": 4,
            "train.seed": 3, "parallel.tp": 2, "parallel.pp": 2, "parallel.zero_stage": 1, "diffusion.objective": "ar",
            "diffusion.block_size": 8, "model.num_layers": 4, "model.hidden_size": 128, "data.seq_len": 64, "logging.wandb": "disabled"}
    assert set(vals) == set(REQUIRED_KEYS)
    cfg = load_config("configs/tiny.yaml", [f"{k}={v}" for k, v in vals.items()])
    for k, v in vals.items():
        sec, f = k.split(".")
        assert getattr(getattr(cfg, sec), f) == v


@pytest.mark.parametrize("override,needle", [
    ("train.stepz=3", "unknown config key 'train.stepz'"),
    ("trian.steps=3", "unknown config key 'trian.steps'"),
    ("train.steps=abc", "train.steps: expected an integer"),
    ("train.steps=-1", "train.steps must be > 0"),
    ("diffusion.objective=foo", "diffusion.objective='foo' is not one of"),
    ("logging.wandb=maybe", "logging.wandb='maybe'"),
    ("parallel.zero_stage=4", "parallel.zero_stage must be 0, 1, 2 or 3"),
    ("train.micro_batch_size=5", "not a multiple of train.micro_batch_size"),
    ("model.hidden_size=250", "not divisible by model.num_attention_heads=4; set model.kv_channels"),
    ("model.kv_channels=0", "model.kv_channels must be > 0"),
    ("train", "is not of the form section.key=value"),
    ("train=3", "is a section"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_kv_channels_free_heads_from_hidden_size():
    """With model.kv_channels (Qwen3-style heads) hidden_size need not divide by the heads."""
    cfg = load_config("configs/tiny.yaml", ["model.hidden_size=250", "model.kv_channels=32"])
    assert cfg.model.kv_channels == 32


def test_block_size_must_divide_seq_len():
    with pytest.raises(ConfigError, match="diffusion.block_size=5 must divide data.seq_len=128"):
        load_config("configs/tiny.yaml", ["diffusion.objective=block", "diffusion.block_size=5"])


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layers: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text("model:\n  num_layerz: 2\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.num_layerz'"):
        load_config(bad)


def _class_field_docstrings(module) -> dict:
    """{class name: [(field, docstring or None), ...]} for every dataclass in ``module``'s
    source: the docstring of a field is the string statement right after its annotation."""
    import ast
    import dataclasses
    import inspect

    out = {}
    for node in ast.parse(inspect.getsource(module)).body:
        if not isinstance(node, ast.ClassDef) or not dataclasses.is_dataclass(getattr(module, node.name, None)):
            continue
        body, fields = node.body, []
        for i, stmt in enumerate(body):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                nxt = body[i + 1] if i + 1 < len(body) else None
                doc = nxt.value.value if (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                                          and isinstance(nxt.value.value, str)) else None
                fields.append((stmt.target.id, doc))
        out[node.name] = fields
    return out


def test_every_field_is_documented():
    """Every field of every config dataclass (and of the samplers' configs) has its own
    docstring right below it, and --help prints that docstring under that key."""
    from dlm_megatron import config as config_mod
    from dlm_megatron.sampling import continuous as cont_mod
    from dlm_megatron.sampling import masked as masked_mod

    text = describe()
    for k in REQUIRED_KEYS:
        assert k in text
    found = {}
    for mod in (config_mod, masked_mod, cont_mod):
        found.update(_class_field_docstrings(mod))
    assert {"Config", "ModelConfig", "TrainConfig", "SamplerConfig", "ContinuousSamplerConfig"} <= set(found)
    for cls, fields in found.items():
        assert fields, cls
        for name, doc in fields:
            assert doc is not None and doc.strip(), f"{cls}.{name} has no docstring of its own"
        docs = [" ".join(d.split()) for _, d in fields]
        dupes = {d for d in docs if docs.count(d) > 1}
        assert not dupes, f"{cls}: several fields share the docstring {dupes}"
    # describe() pairs each key with its own docstring (not a neighbour's).
    lines = text.splitlines()
    for section in ("model", "diffusion", "data", "train", "parallel", "logging", "generate"):
        cls = type(getattr(config_mod.Config(), section)).__name__
        for name, doc in found[cls]:
            i = next(j for j, ln in enumerate(lines) if ln.startswith(f"  {section}.{name} = "))
            assert lines[i + 1].strip() == doc.strip().splitlines()[0].strip(), (section, name)


def test_cli_bad_key_is_one_line_exit_2():
    p = subprocess.run([sys.executable, "-m", "dlm_megatron.train", "configs/tiny.yaml", "train.stepz=3"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    err = [l for l in p.stderr.splitlines() if l.strip() and "warn" not in l.lower()]
    assert len(err) == 1 and err[0] == "error: unknown config key 'train.stepz'; did you mean 'train.steps'?", p.stderr


def test_qk_norms_at_tp2_run_on_the_megatron_engine():
    """Per-head q/k norm weights get a partial gradient on each TP rank (its heads only): auto
    picks the megatron engine, which sums it over TP; DeepSpeed, which does not, is refused in
    one line (tests/distributed/test_layouts.py proves the megatron engine's result)."""
    from dlm_megatron.config import resolved_engine

    def cfg(*o):
        return load_config(f"{REPO}/configs/tiny.yaml", ["model.qk_layernorm=true", *o])

    assert resolved_engine(cfg("parallel.tp=2").parallel, cfg("parallel.tp=2").model) == "megatron"
    assert resolved_engine(cfg().parallel, cfg().model) == "deepspeed"  # tp=1: every rank has every head
    with pytest.raises(ConfigError, match=r"model.qk_layernorm=true at parallel.tp=2 needs parallel.engine=megatron") as e:
        cfg("parallel.tp=2", "parallel.engine=deepspeed")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"zero_stage=2 is not supported by the megatron engine \(auto picks it"):
        cfg("parallel.tp=2", "parallel.zero_stage=2")
