"""The study's fine-tuning cells on Dask: a local cluster of worker processes on loopback, closed
with the study; cells as task runs of the flow run, an MLflow run per cell, failures reported,
the cache across flow runs; an unreachable scheduler is one config error."""
import os
import socket
import sys
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient
from prefect import flow, task

from flows.config import StudyConfig
from model.config import ConfigError
from tests.test_study import FAST_TRAIN, study_config

# What a cell's process must see as the flow does.
FLOW_ENV = ("PRETRAIN_HOME", "HF_HUB_OFFLINE", "MLFLOW_TRACKING_URI")


def _listening(pids) -> set[tuple[str, int]]:
    return {(conn.laddr.ip, conn.laddr.port) for pid in pids if psutil.pid_exists(pid)
            for conn in psutil.Process(pid).net_connections(kind="inet") if conn.status == psutil.CONN_LISTEN}


@pytest.mark.usefixtures("prefect_harness")
def test_local_cluster_on_loopback_sees_the_flow_environment_and_closes(workspace, monkeypatch):
    from flows.matrix import cell_runner

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
    before = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONHASHSEED")}
    with cell_runner(StudyConfig(task_runner="dask", dask_workers=2)) as (runner, threads):
        client = runner.client
        seen = client.run(lambda keys: {k: os.environ.get(k) for k in keys}, FLOW_ENV)
        pids = client.run(os.getpid)
        assert threads == max(1, (os.cpu_count() or 1) // 2)
        assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
        assert all(env == {k: os.environ.get(k) for k in FLOW_ENV} for env in seen.values()), seen
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        assert not client.dashboard_link or client.dashboard_link.startswith("http://127.0.0.1:")
        sockets = _listening([os.getpid(), *pids.values()])
        assert len(sockets) >= 3  # the scheduler and each worker
        assert {ip for ip, _ in sockets} == {"127.0.0.1"}, sockets
    deadline = time.monotonic() + 30
    while any(psutil.pid_exists(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(psutil.pid_exists(p) for p in pids.values()), "the workers outlived the study"
    assert not sockets & _listening([os.getpid()])
    # The nanny sets these in the process that starts the workers; pretraining after the study would inherit them.
    assert {k: os.environ.get(k) for k in before} == before


@pytest.mark.usefixtures("prefect_harness")
def test_unreachable_scheduler_is_one_config_error():
    import dask

    from flows.matrix import cell_runner

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        with pytest.raises(ConfigError, match=r"study.dask_address .* no Dask scheduler answers.*dask scheduler"):
            with cell_runner(StudyConfig(task_runner="dask", dask_address=address)):
                pass


@pytest.mark.usefixtures("prefect_harness")
def test_study_cells_run_on_two_dask_workers_and_rerun_from_cache(tmp_path, workspace):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from flows.pipeline import StudyIncomplete, pretrain_pipeline

    # freeze-9 asks for more frozen layers than the tiny model has: its cells fail in the worker.
    config = study_config(tmp_path, objectives=["clm"], train={**FAST_TRAIN, "max_steps": 10, "eval_interval": 5},
                          downstream={"n_classes": 4, "seeds": [0, 1], "finetune": {"epochs": 1, "max_len": 64},
                                      "methods": {"full": {}, "freeze-9": {"method": "freeze", "freeze_layers": 9}}},
                          study={"task_runner": "dask", "dask_workers": 2})
    good = {f"{v}/full/s{s}" for v in ("clm", "random-init") for s in (0, 1)}
    bad = {f"{v}/freeze-9/s{s}" for v in ("clm", "random-init") for s in (0, 1)}
    for _ in range(2):
        with pytest.raises(StudyIncomplete, match="freeze_layers=9 but the model has 2 layers"):
            pretrain_pipeline(config_path=str(config))

    c = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    exp = c.get_experiment_by_name("study-test")
    flow_runs = [r.data.tags["prefect.flow_run_id"] for r in c.search_runs([exp.experiment_id], order_by=["start_time"])
                 if r.info.run_name.startswith("pipeline-")]
    assert len(flow_runs) == 2
    runs = {}
    for r in c.search_runs([exp.experiment_id], "tags.mlflow.parentRunId != ''", order_by=["start_time"]):
        runs.setdefault(r.info.run_name, r)  # the first flow run's
    assert good | bad <= set(runs)
    for name in good:
        run = runs[name]
        assert run.info.status == "FINISHED" and 0 <= run.data.metrics["test/accuracy"] <= 1, name
    for name in bad:
        assert runs[name].info.status == "FAILED" and "freeze_layers=9" in runs[name].data.tags["error"], name
    workers = {runs[n].data.tags["dask_worker"] for n in good | bad}
    assert len(workers) == 2 and all(w.startswith("tcp://127.0.0.1:") for w in workers), workers

    def finetune_runs(flow_run_id: str) -> dict:
        with get_client(sync_client=True) as prefect:
            task_runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return {t.name: t.state.name for t in task_runs if t.name.startswith("finetune-")}

    def task_run(cell: str) -> str:
        return "finetune-" + cell.rsplit("/", 1)[0] + "-" + cell.rsplit("/", 1)[1]

    # What the Prefect UI shows: the cells as task runs of each flow run, where they went, the workers' logs.
    first, second = finetune_runs(flow_runs[0]), finetune_runs(flow_runs[1])
    assert first == {**{task_run(n): "Completed" for n in good}, **{task_run(n): "Failed" for n in bad}}
    assert second == {**{task_run(n): "Cached" for n in good}, **{task_run(n): "Failed" for n in bad}}
    APILogHandler().flush()
    with get_client(sync_client=True) as prefect:
        logs = prefect.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_runs[0]])))
    announced = [x.message for x in logs if x.message.startswith("fine-tuning cells on Dask")]
    assert len(announced) == 1 and "scheduler tcp://127.0.0.1:" in announced[0] and "2 worker(s)" in announced[0]
    assert any("freeze_layers=9" in x.message for x in logs if x.task_run_id)


@task(name="finetune-killed")
def _killed(seed: int, variant: str = "", num_threads: int = 0, finetune_config: dict | None = None,
            random_model: dict | None = None) -> dict:
    time.sleep(5)  # long enough for Prefect to record the run as running, as a real cell would be
    os._exit(137)  # what the kernel's out-of-memory killer leaves behind


@pytest.mark.usefixtures("prefect_harness")
def test_a_cell_whose_worker_dies_fails_alone_and_is_crashed_in_prefect(monkeypatch):
    import cloudpickle
    import dask
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows import matrix
    from model.finetune import FinetuneConfig

    @flow
    def cells_only():
        return matrix.run_cells([{"name": "random-init", "objective": None, "model_config": {}}],
                                {"full": FinetuneConfig()}, [0], {}, StudyConfig(task_runner="dask", dask_workers=1),
                                lambda cell, cached: None)

    monkeypatch.setattr(matrix, "finetune_downstream", _killed)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the worker need not import this test module
    try:
        with dask.config.set({"distributed.scheduler.allowed-failures": 0}):  # no retry on a fresh worker
            state = cells_only(return_state=True)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    (cell,) = state.result()
    assert cell["error"].startswith("KilledWorker: the process running the cell died"), cell
    with get_client(sync_client=True) as prefect:
        (task_run,) = prefect.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert task_run.name.startswith("finetune-killed") and task_run.state.name == "Crashed", task_run.state
