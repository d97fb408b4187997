"""Cache keys on a stage's inputs and its code version; retries on I/O errors only."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import duckdb

from tasks.workspace import code_version


# Modules only the evaluation stages run: editing them must not re-run pretraining or its data stages.
EVALUATION_ONLY = ("model/finetune.py", "warehouse/task_files.py", "warehouse/contamination.py")


def stage_cache_key(*packages: str, exclude: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> Callable:
    """A Prefect `cache_key_fn`: task name + inputs (minus `exclude`) + source hash of `packages`
    (minus the `skip` files)."""

    def key(context, parameters: dict[str, Any]) -> str:
        inputs = {k: v for k, v in parameters.items() if k not in exclude}
        payload = json.dumps(inputs, sort_keys=True, default=str)
        h = hashlib.sha256(f"{context.task.name}|{payload}|{code_version(*packages, skip=skip)}".encode())
        return h.hexdigest()

    return key


def retry_on_io(task, task_run, state) -> bool:
    """Retry only what a second attempt can fix: file-system and database-lock errors."""
    try:
        state.result()
    except (OSError, duckdb.IOException):
        return True
    except Exception:
        return False
    return False


def outputs_exist(result: Any) -> bool:
    """A cached result is only usable while the files it names are still on disk."""
    paths = result.get("outputs", []) if isinstance(result, dict) else []
    return all(Path(p).exists() for p in paths)


def run_stage(task_fn, **kwargs) -> tuple[Any, bool]:
    """Run a cached task; returns (result, served_from_cache). Re-runs if cached outputs were deleted."""
    state = task_fn(**kwargs, return_state=True)
    result = state.result()
    cached = state.name == "Cached"
    if cached and not outputs_exist(result):
        state = task_fn.with_options(refresh_cache=True)(**kwargs, return_state=True)
        result, cached = state.result(), False
    return result, cached
