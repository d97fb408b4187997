"""Where everything lives: one folder, PRETRAIN_HOME (default ./workspace).

Imports nothing heavy: `configure_environment()` must run before Prefect is imported, so that
Prefect's home (database, result storage) is inside the workspace too.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def from_env(cls) -> "Workspace":
        return cls(Path(os.environ.get("PRETRAIN_HOME", "workspace")).expanduser().resolve())

    @property
    def warehouse(self) -> Path:
        return self.root / "warehouse.duckdb"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_uri(self) -> str:
        """MLFLOW_TRACKING_URI when set (a shared tracking server, or a SQL database such as
        postgresql://...), else the SQLite store in the workspace."""
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.mlflow_db}"

    @property
    def local_mlflow(self) -> bool:
        return self.mlflow_uri == f"sqlite:///{self.mlflow_db}"

    @property
    def artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    def stage_dir(self, kind: str, key: str) -> Path:
        return self.root / kind / key


def configure_environment(ws: Workspace | None = None) -> Workspace:
    """Point Prefect at the workspace (unless the user configured Prefect already) and quiet its telemetry."""
    ws = ws or Workspace.from_env()
    ws.root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(ws.prefect_home))
    # Otherwise the temporary server's telemetry races its own SQLite database on first start.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's 20 s for its temporary server to start is too short on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PRETRAIN_HOME", str(ws.root))
    return ws


@lru_cache(maxsize=None)
def code_version(*packages: str, skip: tuple[str, ...] = ()) -> str:
    """Hash of the source of the given packages (minus the `skip` files): a code change invalidates
    the stages it affects."""
    h = hashlib.sha256()
    for package in sorted(packages):
        for path in sorted((PACKAGE_ROOT / package).rglob("*.py")):
            if str(path.relative_to(PACKAGE_ROOT)) in skip:
                continue
            h.update(str(path.relative_to(PACKAGE_ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


@lru_cache(maxsize=1)
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
