"""MLflow beyond the workspace: MLFLOW_TRACKING_URI points runs at a shared SQL store or server."""
from tasks.tracking import client, experiment_id, start_run
from tasks.workspace import Workspace


def test_runs_go_to_the_tracking_uri_when_one_is_set(tmp_path, monkeypatch):
    shared = tmp_path / "shared" / "mlflow.db"
    shared.parent.mkdir()
    monkeypatch.setenv("PRETRAIN_HOME", str(tmp_path / "ws"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{shared}")
    ws = Workspace.from_env()
    assert not ws.local_mlflow
    c = client(ws)
    exp = experiment_id(c, ws, "shared-exp")
    run = start_run(c, exp, "r")
    assert shared.exists() and not ws.mlflow_db.exists()
    assert c.get_run(run).info.experiment_id == exp
    assert str(ws.artifacts) not in c.get_experiment(exp).artifact_location  # the store decides, not the workspace


def test_without_it_the_workspace_sqlite_store_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("PRETRAIN_HOME", str(tmp_path / "ws"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ws = Workspace.from_env()
    assert ws.local_mlflow and ws.mlflow_uri == f"sqlite:///{ws.mlflow_db}"
    c = client(ws)
    experiment_id(c, ws, "local-exp")
    assert ws.mlflow_db.exists()
