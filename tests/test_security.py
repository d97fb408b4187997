"""Nothing in data or config executes code, nothing secret reaches MLflow, nothing listens beyond loopback."""
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.config import load_config
from model import checkpoint as ckpt
from model.checkpoint import CheckpointError, load_pretrained, save_checkpoint
from model.config import ConfigError, ModelConfig, TrainConfig
from model.objectives import get_objective
from tasks.tracking import log_dict, log_params, start_run
from tests.conftest import ROOT

PRODUCT = ["model", "tasks", "flows", "warehouse", "benchmarks"]


class Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_in_place_of_the_weights_is_refused_and_never_run(tmp_path):
    cfg = TrainConfig(model=ModelConfig(vocab_size=64, n_layers=1, d_model=16, n_heads=2, d_ff=32, max_seq_len=16))
    target = save_checkpoint(tmp_path / "checkpoint", get_objective("mlm").build(cfg.model, cfg), cfg, {"step": 1})
    marker = tmp_path / "code-ran"
    (target / "model.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    # Re-seal the checksums, as someone who hands over a crafted checkpoint would.
    ckpt.seal(target)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_pretrained(target)
    assert not marker.exists()


def test_the_product_never_unpickles():
    """No pickle loading anywhere, torch.load only with weights_only=True, Prefect results as JSON."""
    offenders = []
    for folder in PRODUCT:
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for pattern in (r"pickle\.loads?\(", r"torch\.load\((?![^)]*weights_only=True)", r"cloudpickle"):
                offenders += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(pattern, text)]
            # Prefect's default result serializer is pickle: every persisted task result must be JSON.
            for deco in re.findall(r"@task\((.*?)\)\n(?:async )?def", text, flags=re.S):
                if "persist_result" in deco or "**CACHED" in deco:
                    if 'result_serializer="json"' not in deco and "**CACHED" not in deco:
                        offenders.append(f"{path.relative_to(ROOT)}: @task({deco[:60]}...)")
    assert not offenders
    from tasks.data import CACHED

    assert CACHED["result_serializer"] == "json"


@pytest.mark.parametrize("how", ["file", "override"])
def test_configs_cannot_execute_code(tmp_path, how):
    marker = tmp_path / "code-ran"
    payload = f'!!python/object/apply:os.system ["touch {marker}"]'
    config = tmp_path / "evil.yaml"
    if how == "file":
        config.write_text(f"experiment: {payload}\n")
        overrides = []
    else:
        config.write_text("experiment: fine\n")
        overrides = [f"experiment={payload}"]
    with pytest.raises(ConfigError) as exc:
        load_config(config, overrides)
    assert "\n" not in str(exc.value) and "YAML" in str(exc.value)
    assert not marker.exists()


def test_secrets_never_reach_mlflow(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefSECRET123")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.create_experiment("secrets", artifact_location=(tmp_path / "artifacts").as_uri())
    run = start_run(c, exp, "r", tags={"config_path": "https://alice:pa55word@example.org/cfg.yaml"})
    values = {"source": "s3://AKIA:wJalrXUtnFEMI/K7MDENG@bucket/corpus", "header": "Bearer hf_abcdefSECRET123",
              "url": "https://alice:pa55word@example.org/data.jsonl", "plain": "https://example.org/data"}
    log_params(c, run, values)
    log_dict(c, run, {"corpus": values}, "config.json")
    stored = c.get_run(run).data
    artefact = Path(c.download_artifacts(run, "config.json", str(tmp_path))).read_text()
    everything = json.dumps(stored.params) + json.dumps(stored.tags) + artefact
    for secret in ("hf_abcdefSECRET123", "wJalrXUtnFEMI/K7MDENG", "pa55word", "alice:"):
        assert secret not in everything
    assert stored.params["plain"] == "https://example.org/data"
    assert stored.params["url"] == "https://***@example.org/data.jsonl"


def test_binding_beyond_loopback_needs_the_option_and_warns(tmp_path):
    # An unroutable port range makes the servers fail fast; what matters is the warning printed first.
    out = subprocess.run([sys.executable, "-m", "flows.cli", "ui", "--host", "0.0.0.0", "--timeout", "1",
                          "--prefect-port", "1", "--mlflow-port", "1"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PRETRAIN_HOME": str(tmp_path / "ws")})
    assert "warning: binding to 0.0.0.0 exposes the UIs" in " ".join(out.stderr.split())
    assert out.returncode != 0
    helps = subprocess.run([sys.executable, "-m", "flows.cli", "ui", "--help"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60, env={**os.environ, "COLUMNS": "200"}).stdout
    assert "127.0.0.1" in helps  # the default; the loopback binding itself is checked in test_pipeline
