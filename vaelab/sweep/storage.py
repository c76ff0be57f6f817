"""Where a study lives: an Optuna storage from the string a config gives, and that string as
it may be shown.

A plain path is a journal file (the embedded default: no server). A URL is a database that many
workers on many machines share, e.g. `postgresql+psycopg://vaelab@db.example.org/vaelab`.
Leave the password out of the URL: libpq reads PGPASSWORD or ~/.pgpass, and vaelab reads
VAELAB_STORAGE_PASSWORD for any database. A password written into the URL anyway is taken out
by the sweeper before anything is logged, tagged or handed to a job (`masked`,
`split_password`).
"""

import fcntl
import functools
import logging
import os
import random
import time
import warnings
from pathlib import Path
from typing import IO

import sqlalchemy.exc
from optuna.exceptions import ExperimentalWarning
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import BaseJournalFileLock  # the lock interface (not exported)
from sqlalchemy.engine import URL, make_url

log = logging.getLogger(__name__)

PASSWORD_VARIABLE = "VAELAB_STORAGE_PASSWORD"
# How often a running trial tells a database storage it is alive, and how long a silent trial
# stays RUNNING before a worker fails it and runs its parameters again (Optuna's heartbeat).
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 120
# Connections per process. Each worker needs one at a time (its sweeper and its job take turns),
# so 16 workers hold at most 16 x 3 of PostgreSQL's default 100. pre_ping replaces a connection
# the server dropped (a restart, an idle timeout) instead of failing the next query with it.
SERVER_ENGINE = {"pool_size": 1, "max_overflow": 2, "pool_pre_ping": True, "pool_recycle": 600}
OPEN_ATTEMPTS = 5  # workers that create the schema of a new database at once may collide


def open_storage(spec: str, grace_seconds: float = GRACE_SECONDS) -> BaseStorage:
    """An Optuna storage from config: a database URL or a journal file.

    A plain path becomes a JournalStorage on that file: several processes append to it safely
    (file lock), with no server. A URL becomes an RDBStorage with Optuna's heartbeat on, so a
    trial whose worker died is found by its silence. One storage per process and spec: the
    sweeper and its jobs share one connection pool.
    """
    if "://" not in spec:
        path = Path(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        return _journal(str(path.absolute()))
    return _database(with_password(spec), int(max(grace_seconds, HEARTBEAT_SECONDS + 1)))


@functools.cache
def _journal(path: str) -> JournalStorage:
    return JournalStorage(JournalFileBackend(path, lock_obj=FlockLock(path)))


class FlockLock(BaseJournalFileLock):
    """The journal's write lock as a blocking flock on <journal>.lock.

    Optuna's default lock (a symlink) polls with a back-off of up to 1 s, so two workers
    writing a shared journal a few dozen times a trial (user attrs, heartbeats, reports) lost
    a third of their throughput waiting: a flock waiter wakes the moment it is free, and a
    dead holder's lock goes with its process.
    """

    def __init__(self, journal: str) -> None:
        self.path = f"{journal}.lock"
        self.file: IO[str] | None = None

    def acquire(self) -> bool:
        self.file = open(self.path, "a")  # noqa: SIM115 (released in release())
        fcntl.flock(self.file, fcntl.LOCK_EX)
        return True

    def release(self) -> None:
        assert self.file is not None
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
        self.file = None


@functools.cache
def _database(url: str, grace_seconds: int) -> RDBStorage:
    """An RDBStorage, retried when workers starting together race to create its tables."""
    server = not url.startswith("sqlite")
    for attempt in range(1, OPEN_ATTEMPTS + 1):
        try:
            with warnings.catch_warnings():  # the heartbeat is experimental since Optuna 2.9
                warnings.simplefilter("ignore", ExperimentalWarning)
                return RDBStorage(
                    url,
                    engine_kwargs=SERVER_ENGINE if server else {},
                    heartbeat_interval=HEARTBEAT_SECONDS,
                    grace_period=grace_seconds,
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as err:
            if attempt == OPEN_ATTEMPTS:
                raise
            log.debug("Creating the study tables collided with another worker (%s); retrying", err)
            time.sleep(random.uniform(0.1, 0.5) * attempt)
    raise AssertionError("unreachable")


def journal_path(journal_dir: str | Path, study_name: str) -> Path:
    """The journal file of a study that names no storage: one file per study."""
    return Path(journal_dir) / f"{study_name}.journal"


def masked(spec: str) -> str:
    """The storage as it may be logged, tagged or written: any password replaced by ***."""
    if "://" not in spec:
        return spec
    url = make_url(spec)
    return url.render_as_string(hide_password=True) if url.password else spec


def split_password(spec: str) -> tuple[str, str | None]:
    """The storage without its password, and the password (None when the URL has none)."""
    if "://" not in spec:
        return spec, None
    url = make_url(spec)
    if url.password is None:
        return spec, None
    # URL.set(password=None) keeps the password; a URL made anew without one drops it.
    bare = URL.create(
        url.drivername, url.username, None, url.host, url.port, url.database, url.query
    )
    return bare.render_as_string(hide_password=False), str(url.password)


def with_password(spec: str) -> str:
    """A database URL with the password of VAELAB_STORAGE_PASSWORD put back, where the URL
    names a user but no password; libpq still finds PGPASSWORD and ~/.pgpass by itself."""
    password = os.environ.get(PASSWORD_VARIABLE)
    url = make_url(spec)
    if password is None or url.password is not None or url.username is None:
        return spec
    return url.set(password=password).render_as_string(hide_password=False)
