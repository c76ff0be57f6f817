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
import logging
import os
import subprocess
import sys
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
