"""`make ui` as users start it: the MLflow UI over a tiny sweep's store, reached through its
REST API on the loopback address only, in three processes (one uvicorn worker, no job runner),
and stopped with everything it started (tests/servers.py)."""

import contextlib
import socket
import subprocess

import psutil
import pytest
from servers import (
    HTTP,
    MAKE_UI,
    REPO,
    api,
    make_environment,
    process_tree,
    start,
    stop,
    wait_until_up,
)

pytestmark = pytest.mark.slow


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
