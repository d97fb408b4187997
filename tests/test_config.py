from pathlib import Path

import pytest
import yaml

from flows.config import CONFIG_DIR, load_config
from model.config import ARCH_DEFAULTS, SIZES, ConfigError, ModelConfig
from model.objectives import get_objective

SHIPPED = sorted(CONFIG_DIR.rglob("*.yaml"))


def test_configs_are_shipped():
    assert any(p.name == "demo.yaml" for p in SHIPPED)


def _load_shipped(path: Path):
    """A config through the loader of the command that reads it (its first section says which)."""
    sections = yaml.safe_load(path.read_text()) or {}
    if "continual" in sections:
        from flows.continual import load_continual_config
        return load_continual_config(path)[1]
    if "strategies" in sections:
        from flows.strategies import load_strategies_config
        return load_strategies_config(path)[1]
    if "scaling" in sections:
        from flows.scaling import load_scaling_config
        return load_scaling_config(path)[1]
    return load_config(path)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path):
    cfg = _load_shipped(path)
    assert cfg.objectives
    for objective in cfg.objectives:
        arch = get_objective(objective).ARCH
        assert cfg.model_config(arch, 1000).arch == arch


@pytest.mark.parametrize("size", sorted(SIZES))
def test_every_size_builds_for_every_family(size):
    for arch in ARCH_DEFAULTS:
        cfg = ModelConfig.from_name(size, arch=arch)
        assert cfg.d_model % cfg.n_heads == 0 and cfg.arch == arch


def test_a_user_defined_size_in_yaml(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"objectives": ["t5"], "model": {"size": "custom", "overrides": {
        "n_layers": 3, "d_model": 96, "n_heads": 3, "d_ff": 384}}}))
    cfg = load_config(path).model_config("encoder-decoder", 1000)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.norm_kind) == (3, 96, 3, 384, "rms")
    with pytest.raises(ConfigError, match="model size custom needs model.overrides.d_ff"):
        load_config(path, ["model.overrides={n_layers: 3, d_model: 96, n_heads: 3}"])


def test_overrides_apply_with_types():
    cfg = load_config("demo.yaml", ["train.max_steps=7", "model.size=tiny", "objectives=[clm]",
                                    "corpus.path=/some/where", "downstream.seeds=[1, 2]"])
    assert cfg.train["max_steps"] == 7 and cfg.model.size == "tiny" and cfg.objectives == ["clm"]
    assert cfg.corpus.source_specs()[0].path == "/some/where"
    assert cfg.downstream.seeds == [1, 2]


@pytest.mark.parametrize("override,message", [
    ("train.max_stepz=3", "unknown config key 'train.max_stepz'"),
    ("corpus.pathh=x", "unknown config key 'corpus.pathh'"),
    ("objectives=[mlm, gpt5]", "unknown objective 'gpt5'"),
    ("model.size=huge", "model size 'huge' is unknown"),
    ("train.objective=mlm", "train.objective is set by the pipeline"),
    ("train.max_steps=many", "expects int"),
    ("model.overrides={n_layerz: 3}", "model.overrides.n_layerz"),
    ("model.overrides={position: rotary}", "model.position='rotary' is unknown"),
    ("train.mask_prob=1.5", "train.mask_prob=1.5 must be between 0 and 1"),
    ("max_steps", "is not key=value"),
])
def test_bad_config_is_one_clear_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("demo.yaml", [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text(yaml.safe_dump(["a", "list"]))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_a_run_folder_is_named_by_what_it_computes_not_how_it_is_launched():
    from model.config import TrainConfig, run_identity

    one, four = TrainConfig(batch_size=32), TrainConfig(batch_size=32, nproc_per_node=4, parallelism="fsdp")
    assert run_identity(one) == run_identity(four)
    assert run_identity(one) != run_identity(TrainConfig(batch_size=64))
