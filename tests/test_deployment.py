"""prefect.yaml is accepted by `prefect deploy`, and its deployment points at the pipeline flow."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT


@pytest.mark.parametrize("name,flow_name", [("pretrain-demo", "pretrain-pipeline"),
                                            ("continual", "continual-pretraining")])
def test_prefect_yaml_entrypoint_and_parameters_are_valid(name, flow_name, workspace):
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert sorted(d["name"] for d in spec["deployments"]) == ["continual", "pretrain-demo"]
    (dep,) = [d for d in spec["deployments"] if d["name"] == name]
    flow = load_flow_from_entrypoint(str(ROOT / dep["entrypoint"]))
    assert flow.name == flow_name
    flow.validate_parameters(dep["parameters"])
    if name == "continual":
        from flows.continual import load_continual_config as load
    else:
        from flows.config import load_config as load
    load(dep["parameters"]["config_path"], dep["parameters"]["overrides"])


def test_prefect_deploy_registers_the_scheduled_deployment(prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="local-process", type="process"), overwrite=True)
    bin_dir = Path(sys.executable).parent
    out = subprocess.run([str(bin_dir / "prefect"), "--no-prompt", "deploy", "--all"], cwd=ROOT, capture_output=True,
                         text=True, timeout=180, env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("pretrain-pipeline/pretrain-demo")
    assert dep.parameters == {"config_path": "demo.yaml", "overrides": []}
    assert dep.work_pool_name == "local-process"
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]
