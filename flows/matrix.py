"""The fine-tuning matrix of a study: every variant x method x seed is a cell, run as a Prefect task.

Cells are independent, so they run `study.max_parallel` at a time on a thread pool (torch releases
the GIL in its kernels; the CPU threads are shared out between the cells), or, with
`study.task_runner: dask`, on Dask worker processes: a local cluster started for the study, or an
existing cluster on other machines. A cell that fails is recorded with its error and the others go
on. Each cell is an MLflow run nested under its variant's run, with the same keys everywhere
(objective, model_size, method, seed; test/accuracy ...), so MLflow's "compare runs" view lines them
up; only this process writes to MLflow, wherever the cells ran.
"""
from __future__ import annotations

import logging
import os
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.config import StudyConfig
from model.checkpoint import MARKER, sha256_file
from model.config import ConfigError
from tasks import report as reporting
from tasks.evaluation import finetune_downstream
from tasks.tracking import log_metric_rows, log_metrics, log_params, start_run


def cell_inputs(v: dict) -> dict:
    """What a cell fine-tunes: the variant's checkpoint (keyed by its checksums), or a random model."""
    if v.get("objective"):
        return {"checkpoint": v["checkpoint"], "checkpoint_digest": sha256_file(Path(v["checkpoint"]) / MARKER)}
    return {"random_model": v["model_config"]}


@contextmanager
def cell_runner(study: StudyConfig) -> Iterator[tuple[TaskRunner, int]]:
    """The task runner the cells go to, and the torch threads each cell may use; a local Dask
    cluster lives as long as this context."""
    if study.task_runner != "dask":
        threads = max(1, (os.cpu_count() or 1) // study.max_parallel) if study.max_parallel > 1 else 0
        with ThreadPoolTaskRunner(max_workers=study.max_parallel) as runner:
            yield runner, threads
        return
    from prefect_dask import DaskTaskRunner

    if study.dask_address:
        runner = DaskTaskRunner(address=study.dask_address)
    else:
        # One thread per worker process: a cell's parallelism is torch's, set by `num_threads`.
        # Loopback only, and the dashboard on a free port: two studies on one machine must not collide.
        runner = DaskTaskRunner(cluster_kwargs={
            "n_workers": study.dask_workers or study.max_parallel, "threads_per_worker": 1, "processes": True,
            "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"})
    environ, dask_log = dict(os.environ), logging.getLogger("distributed")
    log_level = dask_log.level
    dask_log.setLevel(max(log_level, logging.WARNING))  # dozens of start/stop lines between the stage lines
    try:
        with _api_for_workers(), runner:
            try:
                client = runner.client  # connect now: an unreachable scheduler is a config mistake
            except OSError as exc:
                raise ConfigError(f"study.dask_address {study.dask_address!r}: no Dask scheduler answers ({exc}); "
                                  "start one with `dask scheduler` or leave the key empty for a local cluster") from None
            threads = _threads_per_cell(client)
            _announce(client, threads)
            yield runner, threads
    finally:
        # Dask's nanny sets OMP_NUM_THREADS=1 and friends in the process that starts the workers
        # (this one, for a local cluster): later pretraining subprocesses would inherit them.
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update(environ)
        dask_log.setLevel(log_level)


def _api_for_workers():
    """Workers get the flow's Prefect settings with each task; without PREFECT_API_URL they would each
    start a temporary server of their own, so hand them the address of the flow's one."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        return nullcontext()
    with get_client(sync_client=True) as prefect:
        url = str(prefect.api_url).rstrip("/")
    return temporary_settings(updates={PREFECT_API_URL: url})


def _threads_per_cell(client) -> int:
    """A host's cores shared out between the Dask worker threads on it (each runs one cell at a
    time); the least any host gives. 0 (torch's default) when no worker has joined yet."""
    workers = client.scheduler_info()["workers"]
    cores = client.run(os.cpu_count) if workers else {}
    threads_on: dict[str, int] = defaultdict(int)
    cores_on: dict[str, int] = {}
    for address, w in workers.items():
        threads_on[w["host"]] += w["nthreads"]
        cores_on[w["host"]] = cores.get(address) or 1
    return min((max(1, cores_on[h] // threads_on[h]) for h in threads_on), default=0)


def _announce(client, threads: int) -> None:
    """Where the cells go, in the flow run's log (the Prefect UI), not only on the console."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        logger = get_run_logger()
    except MissingContextError:
        return
    logger.info("fine-tuning cells on Dask: scheduler %s, %d worker(s), %d torch thread(s) per cell, dashboard %s",
                client.scheduler.address, len(client.scheduler_info()["workers"]), threads,
                client.dashboard_link or "off")


def _worker_of(future) -> str:
    """The Dask worker that ran a cell (holds its result): which process to look at when one misbehaves."""
    wrapped = future.wrapped_future
    holders = wrapped.client.who_has([wrapped]).get(wrapped.key) or ()
    return str(holders[0]) if holders else ""


def _lost(future, state, study: StudyConfig) -> str:
    """A cell whose process died mid-run (a Dask worker killed for memory, say): Prefect never heard
    its end, so it is marked Crashed there too, instead of staying Running in the UI for good."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
    from prefect.states import Crashed

    err = future.wrapped_future.exception() if study.task_runner == "dask" else None
    message = (f"{type(err).__name__}: the process running the cell died ({err})" if err
               else f"the cell stopped in state {state.name}")
    try:
        with get_client(sync_client=True) as prefect:
            prefect.set_task_run_state(future.task_run_id, Crashed(message=message), force=True)
    except (ObjectNotFound, PrefectHTTPStatusError):
        pass  # it died before Prefect recorded the run: nothing shows in the UI to correct
    return message


def run_cells(variants: list[dict], methods: dict, seeds: list[int], common: dict, study: StudyConfig,
              on_done) -> list[dict]:
    """Fine-tune every (variant, method, seed); returns the cells in submission order.

    `common` holds the task inputs shared by all cells (warehouse, task, tokenizer, specials);
    `study` says where the cells run and how many at once;
    `on_done(cell, cached)` is called as each cell finishes, in order.
    """
    pending = []
    with cell_runner(study) as (runner, threads):
        for v in variants:
            if v.get("error"):
                for name in methods:
                    for seed in seeds:
                        pending.append(({"variant": v["name"], "method": name, "seed": seed,
                                         "error": f"pretraining failed: {v['error']}"}, None))
                continue
            weights = cell_inputs(v)
            for name, ft in methods.items():
                for lr in ft.lr_grid or [ft.lr]:
                    label = f"{v['name']}/{name}" + (f"/lr{lr:g}" if ft.lr_grid else "")
                    for seed in seeds:
                        params = {**common, **weights,
                                  "finetune_config": asdict(replace(ft, lr=lr, lr_grid=[])),
                                  "seed": seed, "variant": label, "num_threads": threads}
                        future = runner.submit(finetune_downstream, parameters=params)
                        pending.append(({"variant": v["name"], "method": name, "seed": seed, "lr": lr,
                                         "grid": len(ft.lr_grid)}, future))
        cells = []
        for cell, future in pending:
            cached = False
            if future is not None:
                future.wait()
                state = future.state
                cached = state.name == "Cached"
                if study.task_runner == "dask":
                    cell["worker"] = _worker_of(future)
                if state.is_completed():
                    cell.update(future.result())
                elif not state.is_final():
                    cell["error"] = _lost(future, state, study)
                else:
                    err = state.result(raise_on_failure=False)
                    cell["error"] = f"{type(err).__name__}: {err}" if isinstance(err, BaseException) else str(state.message)
            on_done(cell, cached)
            cells.append(cell)
    select_learning_rates(cells)
    return cells


def select_learning_rates(cells: list[dict]) -> None:
    """Per (variant, method), mark the cells of the learning rate with the best mean validation
    accuracy over seeds as `selected`; the report's test scores use those only."""
    groups: dict[tuple, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for cell in cells:
        groups[(cell["variant"], cell["method"])][cell.get("lr", 0.0)].append(cell)
    for by_lr in groups.values():
        def val_accuracy(lr: float) -> float:
            ok = [c["scores"]["validation"]["accuracy"] for c in by_lr[lr] if not c.get("error")]
            return float(np.mean(ok)) if ok else -1.0
        best = max(sorted(by_lr), key=val_accuracy)  # ties go to the smallest rate
        for lr, group in by_lr.items():
            for cell in group:
                cell["selected"] = lr == best


def log_cell(c, exp_id: str, v: dict, cell: dict, task_name: str, tags: dict) -> None:
    """One MLflow run per cell, nested under its variant's run."""
    lr = f"/lr{cell['lr']:g}" if cell.get("grid") else ""
    tags = {**tags, "dask_worker": cell["worker"]} if cell.get("worker") else tags
    run_id = start_run(c, exp_id, f"{v['name']}/{cell['method']}{lr}/s{cell['seed']}", parent=v["run_id"], tags=tags)
    cell["run_id"] = run_id
    log_params(c, run_id, {"objective": v.get("objective") or "none", "model_size": v["size"], "variant": v["name"],
                           "method": cell["method"], "seed": cell["seed"], "finetune_lr": cell.get("lr"),
                           "task": task_name, "snapshot_id": tags.get("snapshot_id", ""), **cell.get("info", {})})
    if cell.get("error"):
        c.set_tag(run_id, "error", cell["error"][:5000])
        c.set_terminated(run_id, "FAILED")
        return
    values = {f"{split}/{k}": val for split, scores in cell["scores"].items() for k, val in scores.items()}
    values.update({k: val for k, val in (v.get("summary") or {}).items()
                   if k.startswith("val/") and isinstance(val, (int, float))})  # the pretraining metrics, for comparison
    log_metric_rows(c, run_id, [{"step": 0, **values}] + [
        {"step": p["epoch"], "finetune/val_accuracy": p["val_accuracy"], "finetune/train_loss": p["train_loss"]}
        for p in cell["curve"]])
    c.set_terminated(run_id, "FINISHED")


def log_variant_summary(c, v: dict, cells: list[dict], methods: list[str], task_name: str) -> None:
    """Mean and 95% interval over seeds on the variant's run: downstream/<task>/<method>/<metric>[_ci95],
    and downstream/<task>/<metric>[_ci95] for the first method."""
    for cell in cells:  # tagged once every cell is done: selection needs all the rates
        if cell["variant"] == v["name"] and cell.get("grid") and cell.get("run_id"):
            c.set_tag(cell["run_id"], "lr_selected", str(cell.get("selected", False)).lower())
    values = {}
    for i, method in enumerate(methods):
        chosen = reporting.chosen_lr(cells, v["name"], method)
        if chosen is not None:
            values[f"downstream/{task_name}/{method}/lr"] = chosen
        for metric, (mean, half) in reporting.cell_summary(cells, v["name"], method).items():
            # The first method's scores also go under the method-free keys every pipeline run has.
            for key in [f"downstream/{task_name}/{method}/{metric}"] + ([f"downstream/{task_name}/{metric}"] if i == 0 else []):
                if mean == mean:
                    values[key] = mean
                if half == half:
                    values[f"{key}_ci95"] = half
    log_metrics(c, v["run_id"], values)
