"""Where a study lives: an Optuna storage from the string a config gives."""

from pathlib import Path

from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend


def open_storage(spec: str) -> str | BaseStorage:
    """An Optuna storage from config: a database URL as it is, or a journal file.

    A plain path becomes a JournalStorage on that file: several processes append to it
    safely (file lock), with no database server, which SQLite cannot promise when sweepers
    race to create one study.
    """
    if "://" in spec:
        return spec
    path = Path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def journal_path(journal_dir: str | Path, study_name: str) -> Path:
    """The journal file of a study that names no storage: one file per study."""
    return Path(journal_dir) / f"{study_name}.journal"
