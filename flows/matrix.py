"""The fine-tuning matrix of a study: every variant x method x seed is a cell, run as a Prefect task.

Cells are independent, so they run `study.max_parallel` at a time on a thread pool (torch releases
the GIL in its kernels; the CPU threads are shared out between the cells). A cell that fails is
recorded with its error and the others go on. Each cell is an MLflow run nested under its variant's
run, with the same keys everywhere (objective, model_size, method, seed; test/accuracy ...), so
MLflow's "compare runs" view lines them up.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from prefect.task_runners import ThreadPoolTaskRunner

from model.checkpoint import MARKER, sha256_file
from tasks import report as reporting
from tasks.evaluation import finetune_downstream
from tasks.tracking import log_metric_rows, log_metrics, log_params, start_run


def cell_inputs(v: dict, floor_model: dict | None) -> dict:
    if v.get("objective"):
        return {"checkpoint": v["checkpoint"], "checkpoint_digest": sha256_file(Path(v["checkpoint"]) / MARKER)}
    return {"random_model": floor_model}


def run_cells(variants: list[dict], methods: dict, seeds: list[int], common: dict, max_parallel: int,
              on_done) -> list[dict]:
    """Fine-tune every (variant, method, seed); returns the cells in submission order.

    `common` holds the task inputs shared by all cells (warehouse, task, tokenizer, specials);
    `on_done(cell, cached)` is called as each cell finishes, in order.
    """
    threads = max(1, (os.cpu_count() or 1) // max_parallel) if max_parallel > 1 else 0
    pending = []
    with ThreadPoolTaskRunner(max_workers=max_parallel) as runner:
        for v in variants:
            if v.get("error"):
                for name in methods:
                    for seed in seeds:
                        pending.append(({"variant": v["name"], "method": name, "seed": seed,
                                         "error": f"pretraining failed: {v['error']}"}, None))
                continue
            for name, ft in methods.items():
                for seed in seeds:
                    params = {**common, **cell_inputs(v, v.get("model_config")), "finetune_config": asdict(ft),
                              "seed": seed, "variant": f"{v['name']}/{name}", "num_threads": threads}
                    future = runner.submit(finetune_downstream, parameters=params)
                    pending.append(({"variant": v["name"], "method": name, "seed": seed}, future))
        cells = []
        for cell, future in pending:
            cached = False
            if future is not None:
                future.wait()
                state = future.state
                cached = state.name == "Cached"
                if state.is_completed():
                    cell.update(future.result())
                else:
                    err = state.result(raise_on_failure=False)
                    cell["error"] = f"{type(err).__name__}: {err}" if isinstance(err, BaseException) else str(state.message)
            on_done(cell, cached)
            cells.append(cell)
    return cells


def log_cell(c, exp_id: str, v: dict, cell: dict, task_name: str, tags: dict) -> None:
    """One MLflow run per cell, nested under its variant's run."""
    run_id = start_run(c, exp_id, f"{v['name']}/{cell['method']}/s{cell['seed']}", parent=v["run_id"], tags=tags)
    cell["run_id"] = run_id
    log_params(c, run_id, {"objective": v.get("objective") or "none", "model_size": v["size"], "variant": v["name"],
                           "method": cell["method"], "seed": cell["seed"], "task": task_name,
                           "snapshot_id": tags.get("snapshot_id", "")})
    if cell.get("error"):
        c.set_tag(run_id, "error", cell["error"][:5000])
        c.set_terminated(run_id, "FAILED")
        return
    log_params(c, run_id, cell.get("info", {}))
    values = {f"{split}/{k}": val for split, scores in cell["scores"].items() for k, val in scores.items()}
    values.update({k: val for k, val in (v.get("summary") or {}).items()
                   if k.startswith("val/") and isinstance(val, (int, float))})  # the pretraining metrics, for comparison
    log_metrics(c, run_id, values)
    log_metric_rows(c, run_id, [{"step": p["epoch"], "finetune/val_accuracy": p["val_accuracy"],
                                 "finetune/train_loss": p["train_loss"]} for p in cell["curve"]])
    c.set_terminated(run_id, "FINISHED")


def log_variant_summary(c, v: dict, cells: list[dict], methods: list[str], task_name: str) -> None:
    """Mean and 95% interval over seeds on the variant's run: downstream/<task>/<method>/<metric>[_ci95]."""
    values = {}
    for method in methods:
        for metric, (mean, half) in reporting.cell_summary(cells, v["name"], method).items():
            if mean == mean:
                values[f"downstream/{task_name}/{method}/{metric}"] = mean
            if half == half:
                values[f"downstream/{task_name}/{method}/{metric}_ci95"] = half
    log_metrics(c, v["run_id"], values)
