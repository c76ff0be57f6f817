"""`make mlflow-server`: one MLflow tracking server that every sweep worker, on any machine,
sends its trials to (`tracking.uri=http://HOST:PORT`).

    python -m vaelab.server --backend-store-uri postgresql+psycopg://postgres@127.0.0.1/mlflow \
        --artifacts-destination multirun/mlartifacts --port 5050

Before the server starts, this creates the PostgreSQL database if it is missing and migrates
its schema once, so no worker and no server process races to do it (MLflow issue #4123: two
processes creating tables at once fail). The server then binds to 127.0.0.1 unless told
otherwise, proxies artifacts (the workers need no access to the artifact store), runs one
uvicorn worker, and leaves MLflow's job runner (GenAI jobs, unused here) off.
"""

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)


def create_database_if_missing(backend_store_uri: str) -> None:
    """A PostgreSQL backend's database, created if missing (connecting to `postgres`)."""
    url = make_url(backend_store_uri)
    if not url.drivername.startswith("postgresql") or not url.database:
        return
    import psycopg  # only a PostgreSQL backend needs it

    conninfo = url.set(drivername="postgresql", database="postgres").render_as_string(
        hide_password=False
    )
    with psycopg.connect(conninfo, autocommit=True) as connection:
        exists = connection.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (url.database,)
        ).fetchone()
        if not exists:
            # Identifiers cannot be query parameters; psycopg quotes this one safely.
            from psycopg import sql

            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(url.database)))
            log.info("Created database %s", url.database)


def migrate(backend_store_uri: str) -> None:
    """Create or upgrade MLflow's tables once, before any server process touches them."""
    subprocess.run(
        [sys.executable, "-m", "mlflow", "db", "upgrade", backend_store_uri],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def server_command(args: argparse.Namespace) -> list[str]:
    """The `mlflow server` command line for these arguments."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--backend-store-uri",
        args.backend_store_uri,
        "--artifacts-destination",
        str(Path(args.artifacts_destination).absolute()),
        "--workers",
        "1",
    ]


@contextlib.contextmanager
def temporary_database(server_url: str, prefix: str = "vaelab_tmp") -> Iterator[str]:
    """A new, empty database on a PostgreSQL server (`postgresql+psycopg://USER@HOST:PORT`),
    dropped afterwards with every connection to it: for tests and benchmarks."""
    import psycopg
    from psycopg import sql

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    create_database_if_missing(url)
    admin = make_url(server_url).set(drivername="postgresql", database="postgres")
    try:
        yield url
    finally:
        with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as db:
            db.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@contextlib.contextmanager
def serving(backend_store_uri: str, artifacts: Path, log_file: Path) -> Iterator[str]:
    """This module's server on a free port of 127.0.0.1, as `make mlflow-server` starts it,
    until the block ends; yields its URI. RuntimeError with the server's log if it does not
    answer within two minutes."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "vaelab.server",
        f"--backend-store-uri={backend_store_uri}",
        f"--artifacts-destination={artifacts}",
        f"--port={port}",
    ]
    uri = f"http://127.0.0.1:{port}"
    with open(log_file, "w") as log_stream:
        # A session of its own: its uvicorn children stop with it.
        server = subprocess.Popen(
            command, stdout=log_stream, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while not _answers(f"{uri}/health"):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{log_file.read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend-store-uri", required=True)
    parser.add_argument("--artifacts-destination", default="multirun/mlartifacts")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5050)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    create_database_if_missing(args.backend_store_uri)
    migrate(args.backend_store_uri)
    Path(args.artifacts_destination).mkdir(parents=True, exist_ok=True)
    command = server_command(args)
    log.info("Serving MLflow on http://%s:%d: %s", args.host, args.port, " ".join(command))
    environment = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    os.execve(sys.executable, command, environment)  # the server replaces this process


if __name__ == "__main__":
    main()
