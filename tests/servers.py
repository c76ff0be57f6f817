"""The UI servers as users start them, for the UI tests (test_ui, test_dashboard,
test_browser): `make ui` and `make dashboard` on free loopback ports, reached through their
HTTP APIs, and stopped with every process they started."""

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


def run_one_feasible_one_infeasible(sweeps, study: str) -> None:
    """A 2-trial grid over the collapse threshold itself (the `sweeps` fixture): at 0 nats the
    trial is feasible, at 1e9 it cannot be (the information constraints are switched off, as
    in test_sweep_end_to_end)."""
    sweeps.run(
        study,
        "sweep.kl_threshold=choice(0.0,1e9)",
        "verdict.min_mi=-1e9",
        "verdict.min_z_gain=-1e9",
        "sweep/pruner=none",
        "hydra.sweeper.n_trials=2",
        search="grid",
    )
