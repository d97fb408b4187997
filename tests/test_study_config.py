"""The `study` keys that say where fine-tuning cells run: good values load, a mistake is one line."""
import pytest

from flows.config import load_config
from model.config import ConfigError


def test_task_runner_defaults_to_the_thread_pool():
    study = load_config(None).study
    assert (study.task_runner, study.dask_address, study.dask_workers) == ("thread", "", 0)


@pytest.mark.parametrize("overrides", [
    ["study.task_runner=dask"],
    ["study.task_runner=dask", "study.dask_workers=3"],
    ["study.task_runner=dask", "study.dask_address=tcp://10.0.0.5:8786"],
    ["study.task_runner=dask", "study.dask_address=scheduler.lab:8786"],
    ["study.task_runner=dask", "study.dask_address=tls://[fd00::5]:8786"],
])
def test_dask_settings_load(overrides):
    study = load_config(None, overrides).study
    assert study.task_runner == "dask"


@pytest.mark.parametrize("overrides, message", [
    (["study.task_runner=ray"], "study.task_runner is 'ray'; choose one of thread, dask"),
    (["study.dask_address=tcp://10.0.0.5:8786"],
     "study.dask_address is set but study.task_runner is 'thread'; set study.task_runner: dask"),
    (["study.task_runner=dask", "study.dask_address=10.0.0.5"],
     "study.dask_address '10.0.0.5' is not a scheduler address; e.g. tcp://10.0.0.5:8786"),
    (["study.task_runner=dask", "study.dask_address=tcp://10.0.0.5:8786", "study.dask_workers=2"],
     "study.dask_workers must be >= 0 and is for the local cluster only"),
    (["study.task_runner=dask", "study.dask_workers=-1"], "study.dask_workers must be >= 0"),
    (["study.task_runer=dask"], "unknown config key 'study.task_runer'"),
])
def test_bad_values_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    text = str(err.value)
    assert message in text and "\n" not in text, text
