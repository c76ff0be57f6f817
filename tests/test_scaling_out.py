"""Sweeps beyond one process, against real servers: several workers on one PostgreSQL study,
trials sent to a real `mlflow server` (vaelab.server), a worker killed mid-trial, sixteen
workers at once, the submitit launcher, and the pieces under them (slots, devices, passwords).

The PostgreSQL tests need a server on 127.0.0.1:5432 that user postgres may enter without a
password (or VAELAB_TEST_POSTGRES=postgresql+psycopg://user@host:port naming another). Each
test gets a database of its own, dropped at the end. With CI=true a missing server fails the
tests; elsewhere they skip, saying how to run them.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import optuna
import psycopg
import pytest
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from vaelab.bench_sweep import start_trivial_workers
from vaelab.runtime import pick_device, trials_on_this_host, worker_slot
from vaelab.server import serving, temporary_database
from vaelab.sweep.storage import (
    PASSWORD_VARIABLE,
    masked,
    open_storage,
    split_password,
    with_password,
)

SERVER = os.environ.get("VAELAB_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432")
HOW_TO_RUN = (
    f"PostgreSQL is not reachable at {SERVER}. Start one on 127.0.0.1:5432 that user postgres "
    "may enter without a password (trust auth), or set VAELAB_TEST_POSTGRES to "
    "postgresql+psycopg://USER@HOST:PORT, then run: .venv/bin/pytest tests/test_scaling_out.py"
)


def admin_conninfo() -> str:
    """libpq's connection string for the server's `postgres` database."""
    url = make_url(SERVER).set(drivername="postgresql", database="postgres")
    return url.render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def postgres():
    """`database()`: the URL of a new, empty database on the real server (dropped at the end)."""
    try:
        psycopg.connect(admin_conninfo(), connect_timeout=5).close()
    except psycopg.OperationalError as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{HOW_TO_RUN}\n({err})")
        pytest.skip(HOW_TO_RUN)
    with contextlib.ExitStack() as databases:

        def database() -> str:
            return databases.enter_context(temporary_database(SERVER, "vaelab_test"))

        yield SimpleNamespace(database=database)


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """A real `mlflow server` started by `python -m vaelab.server` (as `make mlflow-server`
    does) on a PostgreSQL backend of its own, proxying artifacts into a temporary folder."""
    artifacts = tmp_path_factory.mktemp("mlartifacts")
    log_file = tmp_path_factory.mktemp("server") / "server.log"
    with serving(postgres.database(), artifacts, log_file) as uri:
        yield SimpleNamespace(uri=uri, artifacts=artifacts)


def start_workers(command, n, cwd, env=None):
    return [
        subprocess.Popen(
            command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(n)
    ]


def wait_for(workers, timeout=600):
    errors = []
    for worker in workers:
        _, stderr = worker.communicate(timeout=timeout)
        errors.append((worker.returncode, stderr))
    return errors


def runs_of(uri, study):
    """The MLflow client, and the parent and child runs of one study on the server."""
    client = mlflow.MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`sweep.study_name` = '{study}'")
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


# --- several workers on one study ---------------------------------------------------------


@pytest.mark.slow
def test_two_workers_share_a_postgres_study_and_a_tracking_server(
    sweeps, postgres, mlflow_server, tmp_path
):
    storage = postgres.database()
    # A password in the URL (the server trusts, so any works) must reach no file or tag.
    with_secret = storage.replace("postgres@", "postgres:s3cret-pw@")
    command = sweeps.command(
        "pg",
        "hydra.sweeper.n_trials=6",
        "sweep/pruner=none",
        "trainer.epochs=4",
        f"hydra.sweeper.storage={with_secret}",
        f"tracking.uri={mlflow_server.uri}",
    )
    outcomes = wait_for(start_workers(command, 2, tmp_path))
    assert all(code == 0 for code, _ in outcomes), [err[-3000:] for _, err in outcomes]

    study = optuna.load_study(study_name="pg", storage=open_storage(storage))
    trials = study.get_trials()
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    by_worker = {}
    for t in trials:
        by_worker.setdefault(t.user_attrs["sweeper_pid"], []).append(t)
    assert len(by_worker) == 2
    # Neither worker idles while the other trains: each asks for its next trial as soon as
    # its last one ends, and the two train at the same time.
    for own in by_worker.values():
        own.sort(key=lambda t: t.datetime_start)
        gaps = [
            (b.datetime_start - a.datetime_complete).total_seconds()
            for a, b in zip(own, own[1:], strict=False)
        ]
        assert all(gap < 3.0 for gap in gaps), gaps
    first, second = by_worker.values()
    overlap = min(
        max(t.datetime_complete for t in first), max(t.datetime_complete for t in second)
    ) - max(min(t.datetime_start for t in first), min(t.datetime_start for t in second))
    assert overlap.total_seconds() > 0

    client, parents, children = runs_of(mlflow_server.uri, "pg")
    (parent,) = parents
    assert parent.info.status == "FINISHED"
    assert sorted(int(r.data.tags["sweep.trial_number"]) for r in children) == list(range(6))
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert {r.info.status for r in children} == {"FINISHED"}
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    # Every trial's checkpoint went through the server's artifact proxy.
    assert len(list(Path(mlflow_server.artifacts).rglob("model.pt"))) >= 6

    # The password is nowhere: not in any file the sweep wrote, nor in the parent's tags.
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and b"s3cret-pw" in p.read_bytes()]
    assert leaked == []
    assert [k for k, v in parent.data.tags.items() if "s3cret-pw" in v] == []
    assert parent.data.tags["sweep.storage"] == storage  # the URL without its password
    assert all("s3cret-pw" not in err for _, err in outcomes)


@pytest.mark.slow
def test_a_worker_killed_mid_trial_has_its_trial_run_again(
    sweeps, postgres, mlflow_server, tmp_path
):
    storage = postgres.database()
    command = sweeps.command(
        "killed",
        "hydra.sweeper.n_trials=4",
        "sweep/pruner=none",
        "trainer.epochs=40",
        f"hydra.sweeper.storage={storage}",
        f"tracking.uri={mlflow_server.uri}",
    )
    victim, survivor = start_workers(command, 2, tmp_path)
    study = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # the victim's trial, under way with its MLflow run
        try:
            study = study or optuna.load_study(study_name="killed", storage=open_storage(storage))
            if any(
                t.state == TrialState.RUNNING
                and t.user_attrs.get("sweeper_pid") == victim.pid
                and "mlflow_run_id" in t.user_attrs
                for t in study.get_trials()
            ):
                break
        except KeyError:
            pass  # the study is not created yet
        time.sleep(0.2)
    else:
        pytest.fail("the victim never trained a trial")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    ((code, stderr),) = wait_for([survivor])
    assert code == 0, stderr[-3000:]

    trials = study.get_trials()
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    (dead,) = [t for t in trials if t.state == TrialState.FAIL]
    assert dead.user_attrs["sweeper_pid"] == victim.pid
    assert dead.user_attrs["not_counted"].startswith("stale: its worker")
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == [dead.number]]
    assert retry.params == dead.params and retry.state == TrialState.COMPLETE
    assert retry.user_attrs["sweeper_pid"] == survivor.pid
    counted = [t for t in trials if "not_counted" not in t.user_attrs]
    assert len(counted) == 4 and all(t.state == TrialState.COMPLETE for t in counted)

    client, parents, children = runs_of(mlflow_server.uri, "killed")
    runs = {r.info.run_id: r for r in children}
    assert runs[dead.user_attrs["mlflow_run_id"]].info.status == "KILLED"
    assert [r.info.status for r in parents] == ["FINISHED"]
    assert not [r for r in children if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_sixteen_workers_on_postgres_lose_no_trial(postgres, tmp_path):
    storage = postgres.database()
    n_trials = 32
    workers = start_trivial_workers(tmp_path, storage, 16, n_trials, "hydra.sweep.dir=sweep")
    outcomes = wait_for(workers)
    assert all(code == 0 for code, _ in outcomes), [err[-2000:] for _, err in outcomes]
    assert not [err for _, err in outcomes if "too many clients" in err]

    trials = optuna.load_study(study_name="load", storage=open_storage(storage)).get_trials()
    counted = [t for t in trials if "not_counted" not in t.user_attrs]
    assert len(counted) == n_trials and all(t.state == TrialState.COMPLETE for t in counted)
    # A trial asked past n_trials by racing workers is closed untrained, never left open.
    surplus = [t for t in trials if "not_counted" in t.user_attrs]
    assert all(t.state == TrialState.FAIL for t in surplus)
    assert all(t.user_attrs["not_counted"].startswith("surplus") for t in surplus)
    assert len({t.user_attrs["sweeper_pid"] for t in trials}) >= 8  # the workers did share it
    assert len(list(tmp_path.glob("sweep*/.worker"))) == 16  # a sweep folder each


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_database_storage_reconnects_after_the_server_drops_its_connections(postgres):
    storage_url = postgres.database()
    storage = open_storage(storage_url)
    study = optuna.create_study(study_name="drop", storage=storage)
    study.tell(study.ask(), 1.0)
    database = make_url(storage_url).database
    with psycopg.connect(admin_conninfo(), autocommit=True) as connection:
        killed = connection.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s",
            (database,),
        ).fetchone()[0]
    assert killed >= 1  # the pool's connection is gone, as after a server restart
    study.tell(study.ask(), 2.0)  # pre-ping replaces it instead of failing
    assert [t.value for t in study.get_trials()] == [1.0, 2.0]


@pytest.mark.slow
def test_the_submitit_launcher_runs_trials_in_their_own_processes(sweeps, tmp_path):
    sweeps.run(
        "submitit",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "hydra.sweeper.n_trials=2",
        "trainer.epochs=1",
        "sweep/pruner=none",
    )
    journal = tmp_path / "multirun" / "optuna" / "submitit.journal"
    trials = optuna.load_study(study_name="submitit", storage=open_storage(str(journal))).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    # submitit ran each job in a process of its own, not in the sweeper's.
    assert {t.user_attrs["pid"] for t in trials}.isdisjoint(
        {t.user_attrs["sweeper_pid"] for t in trials}
    )
    assert list((tmp_path / "multirun" / "sweeps").rglob(".submitit"))


# --- the pieces: passwords, slots, devices -------------------------------------------------


def test_a_password_is_masked_and_taken_out_of_the_url(monkeypatch):
    url = "postgresql+psycopg://vaelab:pa%40ss@db.example.org:5432/studies?sslmode=require"
    assert (
        masked(url) == "postgresql+psycopg://vaelab:***@db.example.org:5432/studies?sslmode=require"
    )
    bare, password = split_password(url)
    assert password == "pa@ss" and bare == (
        "postgresql+psycopg://vaelab@db.example.org:5432/studies?sslmode=require"
    )
    assert split_password("multirun/optuna/a.journal") == ("multirun/optuna/a.journal", None)
    # A job gets the bare URL and the password from the environment, never the other way.
    monkeypatch.setenv(PASSWORD_VARIABLE, "pa@ss")
    assert make_url(with_password(bare)).password == "pa@ss"
    assert with_password(url.replace("pa%40ss", "other")) == url.replace("pa%40ss", "other")
    monkeypatch.delenv(PASSWORD_VARIABLE)
    assert with_password(bare) == bare  # libpq then reads PGPASSWORD or ~/.pgpass itself


@pytest.mark.slow
def test_a_job_reaches_the_database_with_the_password_from_the_environment(postgres, monkeypatch):
    url = postgres.database()
    monkeypatch.setenv(PASSWORD_VARIABLE, "from-the-environment")
    storage = open_storage(url)
    assert storage.engine.url.password == "from-the-environment"
    optuna.create_study(study_name="env", storage=storage)  # and it connects


def hold_slot(n_parallel, folder, ready, release):
    """A worker process holding a slot until `release` exists."""
    code = (
        "import os, sys, time, pathlib\n"
        f"os.environ['VAELAB_WORKERS_DIR'] = {str(folder)!r}\n"
        "from vaelab.runtime import worker_slot\n"
        f"with worker_slot({n_parallel}) as slot:\n"
        f"    pathlib.Path({str(ready)!r}).write_text(str(slot))\n"
        f"    while not pathlib.Path({str(release)!r}).exists(): time.sleep(0.05)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code])


def test_workers_on_one_host_hold_distinct_slots_and_share_its_cores(tmp_path, monkeypatch):
    monkeypatch.setenv("VAELAB_WORKERS_DIR", str(tmp_path / "slots"))
    release = tmp_path / "release"
    holders = [
        hold_slot(n, tmp_path / "slots", tmp_path / f"ready{k}", release)
        for k, n in enumerate((1, 2))
    ]
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready{k}").exists() for k in range(2)):
            assert time.monotonic() < deadline, "the workers never took their slots"
            time.sleep(0.05)
        taken = sorted(int((tmp_path / f"ready{k}").read_text()) for k in range(2))
        assert taken == [0, 1]
        assert trials_on_this_host() == 3  # 1 + 2 trials at once
        with worker_slot(1) as slot:
            assert slot == 2 and trials_on_this_host() == 4
        holders[0].kill()  # a worker killed with its slot held: the slot is free again
        holders[0].wait()
        assert trials_on_this_host() == 2
        with worker_slot(1) as slot:
            assert slot == int((tmp_path / "ready0").read_text())
        release.touch()
        holders[1].wait(timeout=30)
        assert trials_on_this_host() == 1  # nobody left: a lone trial takes every core
    finally:
        for holder in holders:
            holder.kill()


def test_one_gpu_per_worker_from_a_fake_device_list():
    gpus = ["cuda:0", "cuda:1", "cuda:2"]
    assert [pick_device(gpus, slot) for slot in range(5)] == [
        "cuda:0",
        "cuda:1",
        "cuda:2",
        "cuda:0",
        "cuda:1",
    ]
    assert pick_device(["cuda:0"], 3) == "cuda:0"  # CUDA_VISIBLE_DEVICES=k: the one it sees
    assert pick_device([], 1) == "cpu"


def test_the_slurm_launcher_config_submits_one_gpu_job_a_trial(compose_config):
    cfg = compose_config(["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (1, 1, 1)
    assert launcher.timeout_min == 240 and launcher.cpus_per_task == 4
    assert launcher.submitit_folder.startswith(str(cfg.hydra.sweep.dir))
