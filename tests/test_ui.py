"""`make ui` as users start it: the MLflow UI over a tiny sweep's store, reached through its
REST API on the loopback address only, in three processes (one uvicorn worker, no job runner),
and stopped with everything it started. `serving` starts `make ui` or `make dashboard` for the
other UI tests (tests/test_dashboard.py, tests/test_browser.py)."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# `make ui` depends on the install stamp; -o keeps make from reinstalling the venv (pip) when
# pyproject.toml is newer than the stamp: the test starts the server, it does not install.
MAKE = ["make", "-o", ".venv/.installed"]
MAKE_UI = [*MAKE, "ui"]
# Each server's port variable in the Makefile and the path that answers 200 once it is up.
PORT_VARIABLE = {"ui": "PORT", "dashboard": "DASHBOARD_PORT"}
UP_PATH = {"ui": "/health", "dashboard": "/api/studies"}
# Looping back to 127.0.0.1 must not go through an HTTP proxy set in the environment.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def api(port: int, path: str, body: dict | None = None) -> dict:
    """One MLflow REST call on the loopback address: GET, or POST with a JSON body."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    with HTTP.open(request, timeout=20) as response:
        return json.loads(response.read())


def wait_until_up(
    server: subprocess.Popen, port: int, log: Path, timeout: float, path: str = "/health"
) -> None:
    """Poll `path` until it answers OK, the server exits, or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"{server.args} exited {server.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):  # refused until bound; reset while workers start
            with HTTP.open(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    pytest.fail(
        f"no answer on 127.0.0.1:{port}{path} after {timeout:.0f} s:\n{log.read_text()[-3000:]}"
    )


def make_environment() -> dict[str, str]:
    """This environment without the make flags of a `make test` that runs pytest."""
    return {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}


def start(target: str, log: Path, **variables: object) -> tuple[subprocess.Popen, int]:
    """`make <target> VAR=value ...` on a free port, in a session of its own (stop() ends it
    with everything it started); returns it and its port."""
    port = free_port()
    assigned = [f"{k}={v}" for k, v in {**variables, PORT_VARIABLE[target]: port}.items()]
    with open(log, "w") as output:
        server = subprocess.Popen(
            [*MAKE, target, *assigned],
            cwd=REPO,
            env=make_environment(),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return server, port


@contextlib.contextmanager
def serving(targets: dict[str, dict[str, object]], logs: Path) -> Iterator[dict[str, int]]:
    """`make ui` and/or `make dashboard` ({target: its make variables}) started together and
    answering, until the block ends; yields each target's port. Logs in `logs`."""
    started: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        for target, variables in targets.items():
            started[target] = start(target, logs / f"{target}.log", **variables)
        for target, (server, port) in started.items():
            wait_until_up(server, port, logs / f"{target}.log", 90, UP_PATH[target])
        yield {target: port for target, (_, port) in started.items()}
    finally:
        for server, _ in started.values():
            stop(server)


def process_tree(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        leader = psutil.Process(pid)
        return [leader, *leader.children(recursive=True)]
    return []


def stop(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group (make, mlflow, uvicorn and its workers); SIGKILL
    what is left after 30 s, including workers uvicorn respawned while shutting down."""
    descendants = process_tree(server.pid)[1:]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    psutil.wait_procs(descendants, timeout=30)
    # make is not reaped before server.wait(), so its pid (the group id) cannot be reused yet
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    psutil.wait_procs(descendants, timeout=10)
    server.wait(timeout=10)


def tag(run: dict, key: str) -> str | None:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}.get(key)


def test_make_ui_serves_the_sweep_on_loopback_only(tiny_sweep, tmp_path):
    root = tiny_sweep.root
    dry_run = subprocess.run(
        ["make", "-n", *MAKE_UI[1:], f"OUT={root}", "PORT=5999"],
        cwd=REPO,
        env=make_environment(),
        capture_output=True,
        text=True,
        check=True,
    )
    [line] = dry_run.stdout.strip().splitlines()  # the server and nothing else (no install)
    assert "mlflow ui" in line and f"sqlite:///{root}/mlflow.db" in line
    assert "--host 127.0.0.1 --port 5999 --workers 1" in line

    log = tmp_path / "ui.log"
    server, port = start("ui", log, OUT=root)
    members: list[psutil.Process] = []
    try:
        wait_until_up(server, port, log, timeout=90)  # ~5-15 s on 2 busy cores

        # make, the mlflow command and one uvicorn worker: no MLflow job runner (huey).
        members = process_tree(server.pid)
        commands = [" ".join(p.cmdline()) for p in members]
        assert len(members) <= 3, commands
        assert not [c for c in commands if "huey" in c or "job_runner" in c], commands

        # Bound to the loopback address only, by every process listening on the port
        listening = [
            c.laddr
            for p in members
            for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        ]
        assert listening and {address.ip for address in listening} == {"127.0.0.1"}

        with HTTP.open(f"http://127.0.0.1:{port}/", timeout=20) as page:  # the UI itself
            assert page.status == 200 and b"<html" in page.read().lower()

        experiments = [
            e["experiment_id"]
            for e in api(port, "/api/2.0/mlflow/experiments/search", {"max_results": 100})[
                "experiments"
            ]
        ]
        search = "/api/2.0/mlflow/runs/search"
        parents = api(
            port,
            search,
            {
                "experiment_ids": experiments,
                "filter": (
                    "tags.`sweep.role` = 'parent' and "
                    f"tags.`sweep.study_name` = '{tiny_sweep.study}'"
                ),
            },
        ).get("runs", [])
        assert len(parents) == 1
        parent = parents[0]["info"]
        children = api(
            port,
            search,
            {
                "experiment_ids": [parent["experiment_id"]],
                "filter": f"tags.mlflow.parentRunId = '{parent['run_id']}'",
                "max_results": 100,
            },
        ).get("runs", [])
        assert len(children) == tiny_sweep.n_trials
        assert all(tag(c, "trial_state") == "COMPLETE" for c in children)
        assert sorted(int(tag(c, "sweep.trial_number")) for c in children) == list(
            range(tiny_sweep.n_trials)
        )

        child = children[0]["info"]["run_id"]
        listed = api(port, f"/api/2.0/mlflow/artifacts/list?run_id={child}")
        paths = {f["path"] for f in listed["files"]}
        assert {"latents.h5", "multiscale_components.h5", "checkpoints"} <= paths
    finally:
        stop(server)

    with socket.socket() as probe:  # nothing answers on the port any more
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    assert not [p.pid for p in members if alive(p)]


def alive(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.NoSuchProcess):
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    return False
