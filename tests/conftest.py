import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests log to their own workspace, never to a shared server

SPECIALS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: a second torch thread only adds contention."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _environment_kept():
    """A command run in-process (Typer's CliRunner) points PREFECT_HOME at its workspace for the rest of the
    process; without this, later tests' subprocesses would share that workspace's Prefect database."""
    before = dict(os.environ)
    yield
    for key in set(os.environ) - set(before):
        del os.environ[key]
    os.environ.update(before)


# Per test, and per module: a module-scoped fixture (set up before any test's own restore begins) that
# runs a command in-process would otherwise leak into every later module.
_restore_environment = pytest.fixture(autouse=True)(_environment_kept)
_restore_module_environment = pytest.fixture(autouse=True, scope="module")(_environment_kept)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """A real Prefect server (temporary database) shared by the tests that run flows."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    home = tmp_path / "workspace"
    monkeypatch.setenv("PRETRAIN_HOME", str(home))
    return home


def write_corpus(folder: Path, n_docs: int = 60) -> Path:
    """A small corpus of distinct, sentence-like documents in .txt, .md and .jsonl."""
    import json
    import random

    rng = random.Random(0)
    words = ("data model token train layer attention mask predict sentence corpus python function value "
             "return object module class method string list number file error test run loss").split()
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_docs):
        text = " ".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(6))
        if i % 3 == 0:
            (folder / f"doc{i}.txt").write_text(text)
        elif i % 3 == 1:
            (folder / f"doc{i}.md").write_text(f"# Title {i}\n\n{text}")
        else:
            lines.append(json.dumps({"meta": {"id": i}, "text": text}))
    (folder / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def run_cli(*args: str, env: dict | None = None, timeout: int = 600):
    import subprocess

    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
