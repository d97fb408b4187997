"""`pretrain`: the command line (Typer). demo, run, compare, continual, objectives, ui, serve."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.data_cli import data_app
from model.config import ConfigError
from tasks.workspace import Workspace, configure_environment
from warehouse.sources import SourceError
from warehouse.store import WarehouseError

app = typer.Typer(help="An orchestrated lab for pretraining Transformers and comparing objectives.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(data_app, name="data")
console = Console(stderr=True, soft_wrap=True)
USER_ERRORS = (ConfigError, SourceError, WarehouseError, FileNotFoundError)
LOOPBACK = ("127.0.0.1", "localhost", "::1")

SetOption = typer.Option([], "--set", help="Override a config key, e.g. --set train.max_steps=100 (repeatable).")


def fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"[bold red]error:[/bold red] {escape(message)}")
    raise typer.Exit(code)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as r:
            return r.status == 200
    except OSError:
        return False


class _UserErrorsWithoutTraceback(logging.Filter):
    """A mistake in the user's input is one line in Prefect's logs, not a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], USER_ERRORS):
            record.msg, record.args = f"{record.getMessage().splitlines()[0]} {record.exc_info[1]}", ()
            record.exc_info, record.exc_text = None, None
        return True


def _prepare() -> Workspace:
    ws = configure_environment()
    # Reuse a running `pretrain ui` server so runs appear live; otherwise Prefect starts a temporary one.
    if "PREFECT_API_URL" not in os.environ and _answers("http://127.0.0.1:4200/api/health"):
        os.environ["PREFECT_API_URL"] = "http://127.0.0.1:4200/api"
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_UserErrorsWithoutTraceback())
    return ws


class _ServerBoot(threading.Thread):
    """Prefect's temporary API server, started in the background (see `_boot_prefect_server`)."""

    def __init__(self) -> None:
        super().__init__(name="prefect-server-boot", daemon=True)
        self.error: BaseException | None = None

    def run(self) -> None:
        from prefect.server.api.server import SubprocessASGIServer

        try:
            SubprocessASGIServer().start()
        except BaseException as exc:  # noqa: BLE001 - re-raised by wait(); dropped if the command gave up first
            self.error = exc

    def wait(self) -> None:
        self.join()
        if self.error is not None:
            raise self.error


def _boot_prefect_server() -> _ServerBoot | None:
    """Start Prefect's temporary API server now, when no server is configured.

    Prefect would start it at the first flow run and wait for it (a uvicorn process, several
    seconds); started here, it boots on another core while this process imports torch and MLflow.
    The flow then finds the same instance (`SubprocessASGIServer` is one per port) running. A
    command that fails before its flow starts just exits: the server is stopped at exit.
    """
    if os.environ.get("PREFECT_API_URL"):
        return None
    import prefect.server.api.server  # noqa: F401 - imported here, not in the thread: imports take a lock

    booting = _ServerBoot()
    booting.start()
    return booting


RESUMABLE = "stopped by SIGTERM; finished stages and training checkpoints are kept, re-run the same command to resume"


def _run_flow(title: str, config: str, overrides: list[str], load: Callable[[], Any], get_flow: Callable[[], Any],
              stopped: str = RESUMABLE) -> tuple[dict, Workspace, float]:
    """A flow command: the config checked before Prefect starts (bad input fails in a second, in one line),
    the flow run, and its failures as one line each; returns the flow's result, the workspace and the
    flow's wall time. `load()` returns the pipeline config and `get_flow()` the flow: their imports run
    while Prefect's server boots."""
    ws = _prepare()
    booting = _boot_prefect_server()
    from tasks.data import source_fingerprint

    try:
        cfg = load()
        source_fingerprint([s.__dict__ for s in cfg.corpus.source_specs()])
    except USER_ERRORS as exc:
        # The early server is stopped at exit; its "Stopping temporary server" line would be a second line.
        logging.getLogger("prefect").setLevel(logging.WARNING)
        fail(str(exc))
    flow = get_flow()
    if booting:
        booting.wait()  # the flow must not reach the server before it answers
    console.print(f"[bold]{title}[/bold] {config}  workspace {ws.root}")
    signal.signal(signal.SIGTERM, _on_sigterm)
    started = time.perf_counter()
    try:
        state = flow(config_path=str(config), overrides=list(overrides), return_state=True)
    except Terminated:
        _exit_after_failure(stopped, 128 + signal.SIGTERM)
    elapsed = time.perf_counter() - started
    try:
        return state.result(), ws, elapsed
    except USER_ERRORS as exc:
        _exit_after_failure(str(exc), 2)
    except Exception as exc:  # noqa: BLE001 - any other failure: one line, details in Prefect's log above
        _exit_after_failure(f"{type(exc).__name__}: {exc} (flow run state: {state.name})", 1)


def _execute(config: str, overrides: list[str], flow_name: str = "pretrain-pipeline") -> dict:
    def load():
        from flows.config import load_config
        return load_config(config, overrides)

    def get_flow():
        from flows.pipeline import pretrain_pipeline
        return pretrain_pipeline if flow_name == pretrain_pipeline.name else pretrain_pipeline.with_options(name=flow_name)

    result, ws, elapsed = _run_flow("pretrain", config, overrides, load, get_flow)
    _print_summary(result, ws, elapsed)
    return result


class Terminated(KeyboardInterrupt):
    pass


def _on_sigterm(signum, frame) -> None:
    # During the flow Prefect's own handler runs first: it stops the flow (the pretrain task checkpoints
    # and stops its trainer, the MLflow runs are marked) and then passes the signal on to this one.
    raise Terminated()


def _exit_after_failure(message: str, code: int) -> NoReturn:
    """Print the one-line error, run the exit handlers (they stop Prefect's temporary server), and exit.

    Interpreter finalisation is skipped on purpose: with a failed flow's traceback still referenced
    by Prefect's state, DuckDB's bindings print a page of spurious "leaked instance" reports.
    """
    import atexit

    console.print(f"[bold red]error:[/bold red] {message}")
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _print_summary(result: dict, ws: Workspace, elapsed: float) -> None:
    table = Table(title="comparison (test scores: mean over seeds)", show_lines=False)
    methods = [k for k in (result["table"][0] if result["table"] else {}) if k not in ("variant", "val_loss", "error")]
    table.add_column("variant")
    table.add_column("val loss", justify="right")
    for method in methods:
        table.add_column(f"{method} accuracy", justify="right")
        table.add_column(f"{method} macro-F1", justify="right")
    for row in result["table"]:
        cells = [f"{row[m][k]:.3f}" if row[m][k] == row[m][k] else "-" for m in methods for k in ("accuracy", "macro_f1")]
        table.add_row(row["variant"], f"{row['val_loss']:.3f}" if row.get("val_loss") is not None else "-", *cells)
    out = Console()
    out.print(table)
    ran = result["ran_stages"]
    if not ran:
        out.print(f"[green]every stage served from cache[/green] ({len(result['cached_stages'])} stages) in {elapsed:.1f} s")
    else:
        out.print(f"finished in {elapsed:.1f} s; ran {len(ran)} stages, {len(result['cached_stages'])} from cache")
    out.print(f"report:            {result['report']} (shareable: {result['html']})")
    out.print(f"MLflow experiment: {result['experiment']} (id {result['experiment_id']}), parent run {result['parent_run_id']}")
    out.print("MLflow child runs: " + ", ".join(f"{k} {v}" for k, v in result["runs"].items()))
    out.print(f"Prefect flow run:  {result.get('flow_run_name', '')} ({result.get('flow_run_id', '')})")
    home = "" if ws.root == Workspace(Path("workspace").resolve()).root else f"PRETRAIN_HOME={ws.root} "
    out.print(f"open both UIs:     {home}{_self_command()} ui   "
              "(Prefect http://127.0.0.1:4200, MLflow http://127.0.0.1:5000)")


def _self_command() -> str:
    """How the user can call this command again: `pretrain` if it is on PATH, else its path (.venv/bin/...)."""
    argv0 = Path(sys.argv[0])
    on_path = shutil.which("pretrain")
    if argv0.name == "pretrain" and not (on_path and Path(on_path).resolve() == argv0.resolve()):
        try:
            return str(argv0.resolve().relative_to(Path.cwd()))
        except ValueError:
            return str(argv0)
    return "pretrain"


ObjectiveOption = typer.Option([], "--objective", "-o",
                               help="Pretraining objective to run (repeatable; replaces the config's list). "
                                    "`pretrain objectives` lists them.")


def _with_objectives(overrides: list[str], objectives: list[str]) -> list[str]:
    return [*overrides, f"objectives=[{','.join(objectives)}]"] if objectives else overrides


@app.command()
def demo(set_: list[str] = SetOption, objective: list[str] = ObjectiveOption) -> None:
    """The demo pipeline on the built-in corpus (the Python documentation): MLM vs autoregressive LM."""
    _execute("demo.yaml", _with_objectives(set_, objective))


@app.command()
def run(
    config: str = typer.Option(..., "--config", "-c", help="Pipeline config (YAML), e.g. configs/demo.yaml."),
    set_: list[str] = SetOption,
    objective: list[str] = ObjectiveOption,
) -> None:
    """The pipeline on your own config and corpus (e.g. --set corpus.path='texts/**/*.txt')."""
    _execute(config, _with_objectives(set_, objective))


@app.command()
def compare(
    config: str = typer.Option(..., "--config", "-c", help="Study config (YAML), e.g. configs/studies/objectives.yaml."),
    set_: list[str] = SetOption,
    objective: list[str] = ObjectiveOption,
) -> None:
    """A comparison study: objectives x model sizes x fine-tuning methods x seeds at equal compute,
    with confidence intervals, paired tests and a report (markdown, HTML, plots) in MLflow and Prefect."""
    _execute(config, _with_objectives(set_, objective), flow_name="pretrain-study")


@app.command()
def objectives() -> None:
    """The pretraining objectives, with their architecture and what each is."""
    from rich.table import Table

    from model.objectives import DESCRIPTIONS, OBJECTIVES, PRESETS, get_objective

    table = Table("objective", "architecture", "what it is", "preset settings")
    for name in OBJECTIVES:
        settings = ", ".join(f"{k}={v}" for k, v in PRESETS.get(name, {}).items())
        table.add_row(name, get_objective(name).ARCH, DESCRIPTIONS[name], settings)
    Console().print(table)


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A server in its own session, its output appended to `log`: a pipe nobody drains would stall a
    server that runs for days once its buffer fills."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log
    return proc


def _last_line(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _prefect_server_cmd(host: str, port: int) -> list[str]:
    bin_dir = Path(sys.executable).parent
    exe = str(bin_dir / "prefect") if (bin_dir / "prefect").exists() else shutil.which("prefect") or "prefect"
    return [exe, "server", "start", "--host", host, "--port", str(port)]


def _server_env(host: str, port: int) -> dict:
    env = {**os.environ, "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(port)}
    env.pop("PREFECT_API_URL", None)
    return env


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def _wait_healthy(procs: dict, health: dict, ports: dict, timeout: float, on_ready=None) -> None:
    """Wait until every server answers its health URL; one line and exit if one dies or times out."""
    deadline = time.monotonic() + timeout
    pending = set(procs)
    while pending and time.monotonic() < deadline:
        for name in list(pending):
            if procs[name].poll() is not None:
                _stop(procs.values())
                fail(f"the {name} server exited: {_last_line(procs[name].log) or 'no output'} "
                     f"(is port {ports[name]} in use? pass --{name.lower()}-port; log {procs[name].log})")
            if _answers(health[name]):
                pending.discard(name)
                if on_ready:
                    on_ready(name)
        time.sleep(0.5)
    if pending:
        _stop(procs.values())
        fail(f"{', '.join(sorted(pending))} did not answer within {timeout:.0f} s")


@app.command()
def ui(
    host: str = typer.Option("127.0.0.1", help="Interface to bind. Anything but loopback exposes your runs."),
    prefect_port: int = typer.Option(4200),
    mlflow_port: int = typer.Option(5000),
    timeout: float = typer.Option(90.0, help="Seconds to wait for both servers to answer."),
) -> None:
    """Start the Prefect server and the MLflow UI on 127.0.0.1 over this workspace's runs."""
    ws = configure_environment()
    if host not in LOOPBACK:
        console.print(f"[bold yellow]warning:[/bold yellow] binding to {host} exposes the UIs (no authentication) "
                      "to every machine that can reach it")
    env = _server_env(host, prefect_port)
    mlflow_cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", ws.mlflow_uri,
                  "--default-artifact-root", ws.artifacts.as_uri(), "--host", host, "--port", str(mlflow_port)]
    procs = {"Prefect": _start(_prefect_server_cmd(host, prefect_port), env, ws.root / "logs" / "prefect-server.log"),
             "MLflow": _start(mlflow_cmd, env, ws.root / "logs" / "mlflow-server.log")}
    shown = "127.0.0.1" if host in LOOPBACK else host
    urls = {"Prefect": f"http://{shown}:{prefect_port}", "MLflow": f"http://{shown}:{mlflow_port}"}
    health = {"Prefect": urls["Prefect"] + "/api/health", "MLflow": urls["MLflow"] + "/health"}
    signal.signal(signal.SIGTERM, lambda *a: (_stop(procs.values()), sys.exit(0)))
    try:
        _wait_healthy(procs, health, {"Prefect": prefect_port, "MLflow": mlflow_port}, timeout,
                      lambda name: console.print(f"[green]{name} UI[/green]  {urls[name]}"))
        console.print(f"workspace {ws.root}; Ctrl-C stops both")
        while all(p.poll() is None for p in procs.values()):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        _stop(procs.values())


@app.command()
def continual(
    config: str = typer.Option("continual.yaml", "--config", "-c",
                               help="Continual pretraining config (YAML), e.g. configs/continual.yaml."),
    set_: list[str] = SetOption,
) -> None:
    """One run of the continual-pretraining flow now: on new data in the watched sources, continue
    pretraining the champion, measure forgetting, and move the alias if the gate passes."""
    ws = _prepare()
    from flows.continual import check_watched, create_watched_folders, load_continual_config, read_config

    try:  # the common mistakes (config file, continual section, watched folder) fail before anything starts
        cc = read_config(config, set_, ws)[0]
        create_watched_folders(cc, ws)
        check_watched(cc)
    except USER_ERRORS as exc:
        fail(str(exc))
    booting = _boot_prefect_server()
    try:  # the rest of the config, while Prefect's server boots
        cc, _ = load_continual_config(config, set_)
    except USER_ERRORS as exc:
        logging.getLogger("prefect").setLevel(logging.WARNING)
        fail(str(exc))
    from flows.continual import continual_pretraining

    if booting:
        booting.wait()
    console.print(f"[bold]pretrain continual[/bold] {config}  workspace {ws.root}")
    signal.signal(signal.SIGTERM, _on_sigterm)
    started = time.perf_counter()
    try:
        state = continual_pretraining(config_path=str(config), overrides=list(set_), return_state=True)
    except Terminated:
        _exit_after_failure("stopped by SIGTERM; training checkpoints are kept, re-run the same command to resume",
                            128 + signal.SIGTERM)
    try:
        result = state.result()
    except USER_ERRORS as exc:
        _exit_after_failure(str(exc), 2)
    except Exception as exc:  # noqa: BLE001 - any other failure: one line, details in Prefect's log above
        _exit_after_failure(f"{type(exc).__name__}: {exc} (flow run state: {state.name})", 1)
    out = Console()
    out.print(f"{result['message']} ({time.perf_counter() - started:.1f} s)")
    if result.get("trained"):
        out.print(f"gate:              {result['gate']['decision']}: {'; '.join(result['gate']['reasons'])}")
        out.print(f"registered model:  {cc.registered_model}, version {result['version']}; alias {cc.alias!r} -> "
                  f"version {result['champion_version']}")
        out.print(f"report:            {result['report']} (forgetting plot: {result['plot']})")
        out.print(f"MLflow run:        {result['run_id']} (experiment id {result['experiment_id']})")


@app.command()
def strategies(
    config: str = typer.Option("studies/strategies.yaml", "--config", "-c",
                               help="Strategies study config (YAML), e.g. configs/studies/strategies.yaml."),
    set_: list[str] = SetOption,
) -> None:
    """Compare pretraining strategies: static (general corpus), domain-only, general -> domain and
    general -> domain -> task, each fine-tuned with seeds; a report with intervals in MLflow and Prefect."""
    def load():
        from flows.strategies import load_strategies_config
        return load_strategies_config(config, set_)[1]

    def get_flow():
        from flows.strategies import pretrain_strategies
        return pretrain_strategies

    result, _, elapsed = _run_flow("pretrain strategies", config, set_, load, get_flow)
    from tasks.report import fmt

    methods = [k for k in (result["table"][0] if result["table"] else {})
               if k not in ("variant", "phases", "heldout", "steps")]
    corpora = list(result["corpora"])
    table = Table(title="pretraining strategies (test scores: mean ± 95% interval over seeds)")
    for column in ["variant", "phases (steps)", *(f"loss on {p}" for p in corpora),
                   *(f"{m} accuracy" for m in methods), *(f"{m} macro-F1" for m in methods)]:
        table.add_column(column, justify="left" if column in ("variant", "phases (steps)") else "right")
    for row in result["table"]:
        losses = [f"{row['heldout'][p]:.3f}" if p in row["heldout"] else "-" for p in corpora]
        scores = [fmt(*row[m][k]) for k in ("accuracy", "macro_f1") for m in methods]
        table.add_row(row["variant"], row["phases"], *losses, *scores)
    out = Console()
    out.print(table)
    out.print(f"finished in {elapsed:.1f} s")
    out.print(f"report:            {result['report']} (shareable: {result['html']})")
    out.print(f"MLflow experiment: {result['experiment']} (id {result['experiment_id']}), parent run {result['parent_run_id']}")


@app.command()
def scale(
    config: str = typer.Option("studies/scaling.yaml", "--config", "-c",
                               help="Scaling study config (YAML), e.g. configs/studies/scaling.yaml."),
    set_: list[str] = SetOption,
) -> None:
    """Scaling laws: model sizes x FLOP budgets, the compute-optimal frontier and L(N, D) with bootstrap
    intervals, and the largest run predicted from the others; a report in MLflow and Prefect."""
    def load():
        from flows.scaling import load_scaling_config
        return load_scaling_config(config, set_)[1]

    def get_flow():
        from flows.scaling import pretrain_scaling
        return pretrain_scaling

    result, _, elapsed = _run_flow("pretrain scale", config, set_, load, get_flow,
                                   "stopped by SIGTERM; finished runs are kept and cached, re-run the same command to resume")
    from flows.scaling import budget_label, fit_summary

    table = Table(title="scaling runs (final held-out loss)")
    for column in ("run", "N", "budget", "D tokens", "C FLOPs", "loss"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for r in sorted(result["runs"], key=lambda r: (r["budget"], r["N"])):
        table.add_row(r["name"], f"{r['N']:,}", budget_label(r["budget"]), f"{r['D']:,.0f}", f"{r['C']:.3g}",
                      f"{r['loss']:.4f}")
    out = Console()
    out.print(table)
    out.print(f"fits:              {fit_summary(result['fits'])}")
    out.print(f"finished in {elapsed:.1f} s")
    out.print(f"report:            {result['report']} (shareable: {result['html']})")
    out.print(f"MLflow experiment: {result['experiment']} (id {result['experiment_id']}), parent run {result['parent_run_id']}")


def _continual_deployment(config: str, overrides: list[str], every: int, cron: str):
    """The continual deployment as prefect.yaml declares it: one run at a time, late runs queued."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    from flows.continual import continual_pretraining

    schedule = {"cron": cron} if cron else {"interval": every}
    return continual_pretraining.to_deployment(
        name="continual", parameters={"config_path": config, "overrides": overrides}, tags=["pretrain", "continual"],
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        description="Continual pretraining on new data in the watched sources; the alias moves when the gate passes.",
        **schedule)


@app.command()
def serve(
    config: str = typer.Option("demo.yaml", "--config", "-c", help="Pipeline config for the scheduled runs."),
    cron: str = typer.Option("0 3 * * *", help="Schedule (cron, UTC)."),
    name: str = typer.Option("pretrain-pipeline", help="Deployment name."),
    prefect_port: int = typer.Option(4200, help="Port of the Prefect server started when none is configured."),
    set_: list[str] = SetOption,
    continual_config: str = typer.Option("continual.yaml", "--continual-config",
                                         help="Config of the continual-pretraining deployment."),
    continual_every: int = typer.Option(3600, "--continual-every", min=1,
                                        help="Seconds between continual-pretraining runs."),
    continual_cron: str = typer.Option("", "--continual-cron", help="Cron schedule (UTC) instead of --continual-every."),
    continual_set: list[str] = typer.Option([], "--continual-set", help="Override a continual config key (repeatable)."),
    no_continual: bool = typer.Option(False, "--no-continual", help="Serve the pipeline deployment only."),
) -> None:
    """Serve the pipeline deployment and the continual-pretraining deployment with their schedules (no work
    pool needed); runs show in the Prefect UI."""
    ws = _prepare()
    from flows.config import load_config

    try:
        load_config(config, set_)
        if not no_continual:
            from flows.continual import create_watched_folders, load_continual_config

            cc, _ = load_continual_config(continual_config, continual_set)
            for folder in create_watched_folders(cc, ws):
                console.print(f"continual: drop text files into {folder}")
    except USER_ERRORS as exc:
        # The early server is stopped at exit; its "Stopping temporary server" line would be a second line.
        logging.getLogger("prefect").setLevel(logging.WARNING)
        fail(str(exc))
    from prefect import serve as serve_deployments

    from flows.pipeline import pretrain_pipeline

    from prefect.settings import PREFECT_API_URL, temporary_settings

    server, api_url = None, PREFECT_API_URL.value()
    if not api_url:
        # Schedules need a real server (a temporary one runs no scheduler): start one on loopback.
        url = f"http://127.0.0.1:{prefect_port}"
        server = _start(_prefect_server_cmd("127.0.0.1", prefect_port), _server_env("127.0.0.1", prefect_port),
                        ws.root / "logs" / "prefect-server.log")
        _wait_healthy({"Prefect": server}, {"Prefect": f"{url}/api/health"}, {"Prefect": prefect_port}, 90)
        api_url = f"{url}/api"
        console.print(f"Prefect server and UI on {url} (stopped with this command)")
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            deployments = [pretrain_pipeline.to_deployment(name=name, cron=cron,
                                                           parameters={"config_path": config, "overrides": list(set_)})]
            if not no_continual:
                deployments.append(_continual_deployment(continual_config, list(continual_set), continual_every,
                                                         continual_cron))
            serve_deployments(*deployments)
    finally:
        if server is not None:
            _stop([server])


def main() -> None:
    app()


if __name__ == "__main__":
    main()
