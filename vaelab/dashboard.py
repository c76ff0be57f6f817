"""`make dashboard`: optuna-dashboard over a study, with each trial's feasibility.

    python -m vaelab.dashboard multirun/optuna/quick.journal --host 127.0.0.1 --port 8080
    python -m vaelab.dashboard postgresql+psycopg://vaelab@db.example/optuna --port 8080

The storage is a journal file (opened as the sweep workers open it, with their flock) or an
RDB URL (a password in VAELAB_STORAGE_PASSWORD, as for the sweeper). The objective's name comes
from the study itself (the sweeper calls Study.set_metric_names, which optuna-dashboard reads).

Why a module and not the `optuna-dashboard` command: Optuna 5 keeps each constraint of a trial
in a system attr of its own, `constraints:<name>` (Trial.set_constraint; FrozenTrial.constraints
reads them back as a dict), where Optuna 3 and 4 kept one list under `constraints`.
optuna-dashboard 0.21 reads only that list (`_serializer.serialize_frozen_trial`:
`trial_system_attrs.get(CONSTRAINTS_KEY, [])`, CONSTRAINTS_KEY = "constraints"), so every trial
reached its UI with `constraints: []` and looked feasible to its rule (`constraints.every(c =>
c <= 0)`). Writing the old list into the trials as well would make Optuna 5 read each constraint
twice (FrozenTrial.constraints turns the list's entries into constraints "0", "1", ... beside the
named ones), so the storage is left alone and only the function that turns a trial into the
dashboard's JSON is wrapped: its `constraints` become the values of trial.constraints, in the
study's order of constraint names. If optuna-dashboard's internals change, startup stops with
a message saying what changed, rather than serving a dashboard that calls everything feasible.

The dashboard's best trial of a single-objective study is its storage's get_best_trial, which
ignores constraints (Optuna applies them in Study.best_trial, not in the storage); the storage
handed to the dashboard answers with the best feasible trial instead, as Study.best_trial does.
"""

import argparse
import inspect
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from socketserver import ThreadingMixIn
from types import CodeType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna
import optuna_dashboard
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from optuna_dashboard import _serializer

from vaelab.errors import VaelabError
from vaelab.sweep.storage import masked, open_storage
from vaelab.sweep.summary import is_feasible

log = logging.getLogger(__name__)

# What this module relies on in optuna-dashboard 0.21.0 (_serializer.py).
PATCHED_FUNCTION = "serialize_frozen_trial"
PATCHED_SIGNATURE = ["study_id", "trial", "study_system_attrs"]
DASHBOARD_CONSTRAINTS_KEY = "constraints"  # the trial JSON's key, and the system attr it reads


class DashboardChanged(VaelabError):
    """optuna-dashboard's internals are not what vaelab.dashboard patches."""


class ConstraintOrder:
    """Each study's constraint names in the order they first appear, trial after trial.

    The dashboard serialises a study's trials in number order, so this is the order of
    vaelab.sweep.summary.constraint_names; one order per study keeps a value's position the
    same constraint in every trial. A lock: the server answers requests on threads.
    """

    def __init__(self) -> None:
        self._names: dict[int, dict[str, None]] = {}
        self._lock = threading.Lock()

    def values(self, study_id: int, trial: FrozenTrial) -> list[float]:
        """The trial's constraint values in its study's order of names."""
        constraints = trial.constraints  # Optuna 5's named ones (and an old list as "0", ...)
        with self._lock:
            names = self._names.setdefault(study_id, {})
            names.update(dict.fromkeys(constraints))
            order = list(names)
        return [constraints[name] for name in order if name in constraints]


def with_named_constraints(
    serialize: Callable[[int, FrozenTrial, dict[str, Any]], dict[str, Any]],
    order: ConstraintOrder,
) -> Callable[[int, FrozenTrial, dict[str, Any]], dict[str, Any]]:
    """optuna-dashboard's trial serializer, its `constraints` read from Optuna 5's named
    constraints (`constraints:<name>`) instead of the Optuna 4 list under `constraints`."""

    def serialize_frozen_trial(
        study_id: int, trial: FrozenTrial, study_system_attrs: dict[str, Any]
    ) -> dict[str, Any]:
        serialized = serialize(study_id, trial, study_system_attrs)
        serialized[DASHBOARD_CONSTRAINTS_KEY] = order.values(study_id, trial)
        return serialized

    serialize_frozen_trial.__wrapped__ = serialize  # type: ignore[attr-defined]
    return serialize_frozen_trial


def _probe_trial() -> FrozenTrial:
    """A complete trial with one broken named constraint, as vaelab's sweeps record them."""
    return optuna.trial.create_trial(value=1.0, constraints={"kl": 0.5, "mi": -0.25})


def patch_serializer() -> None:
    """Make optuna-dashboard's study API report every trial's named constraints.

    Checks first that _serializer.serialize_frozen_trial is what 0.21 has, called through the
    module (so that wrapping the module's attribute reaches serialize_study_detail) and
    returning a `constraints` key; DashboardChanged otherwise. Idempotent.
    """
    version = optuna_dashboard.__version__
    serialize = getattr(_serializer, PATCHED_FUNCTION, None)
    if serialize is None:
        raise DashboardChanged(
            f"optuna-dashboard {version} has no _serializer.{PATCHED_FUNCTION}: vaelab.dashboard "
            "was written for 0.21.0; use `optuna-dashboard` itself (trials will not show as "
            "infeasible) or update vaelab/dashboard.py"
        )
    if getattr(serialize, "__wrapped__", None) is not None:
        return  # patched already
    parameters = list(inspect.signature(serialize).parameters)
    if parameters != PATCHED_SIGNATURE:
        raise DashboardChanged(
            f"optuna-dashboard {version}: _serializer.{PATCHED_FUNCTION}{tuple(parameters)} is "
            f"not {PATCHED_FUNCTION}{tuple(PATCHED_SIGNATURE)} as in 0.21.0; update "
            "vaelab/dashboard.py"
        )
    if PATCHED_FUNCTION not in _global_names(_serializer.serialize_study_detail.__code__):
        raise DashboardChanged(
            f"optuna-dashboard {version}: serialize_study_detail no longer calls "
            f"{PATCHED_FUNCTION} through its module, so wrapping it would change nothing; "
            "update vaelab/dashboard.py"
        )
    probe = _probe_trial()
    stock = serialize(0, probe, {})
    if DASHBOARD_CONSTRAINTS_KEY not in stock:
        raise DashboardChanged(
            f"optuna-dashboard {version}: a serialized trial has no `constraints` key "
            f"(keys: {sorted(stock)}); update vaelab/dashboard.py"
        )
    if stock[DASHBOARD_CONSTRAINTS_KEY] == list(probe.constraints.values()):
        log.info("optuna-dashboard %s reads Optuna's named constraints itself", version)
        return
    setattr(_serializer, PATCHED_FUNCTION, with_named_constraints(serialize, ConstraintOrder()))


def _global_names(code: CodeType) -> set[str]:
    """The names a function's code looks up, its comprehensions' included (nested code)."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, CodeType):
            names |= _global_names(constant)
    return names


def open_study_storage(spec: str) -> BaseStorage:
    """A journal file (which must exist: a typo would make an empty one) or an RDB URL, whose
    best trial is the best feasible one (with_feasible_best)."""
    if "://" not in spec and not Path(spec).is_file():
        raise VaelabError(
            f"no Optuna journal at {spec}: a sweep writes <output_root>/optuna/<study>.journal "
            "(make dashboard OUT=<output_root> STUDY=<study>)"
        )
    return with_feasible_best(open_storage(spec))


def with_feasible_best(storage: BaseStorage) -> BaseStorage:
    """The storage, its get_best_trial choosing among feasible trials as Study.best_trial does
    (Optuna 5 study.py, _get_best_trial). With no feasible trial it keeps the storage's answer:
    the dashboard needs a trial there, and shows that one as infeasible."""
    stock = storage.get_best_trial

    def get_best_trial(study_id: int) -> FrozenTrial:
        best = stock(study_id)
        if is_feasible(best):
            return best
        complete = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.COMPLETE,))
        feasible = [t for t in complete if is_feasible(t)]
        if not feasible:
            return best
        maximize = storage.get_study_directions(study_id)[0] == StudyDirection.MAXIMIZE
        return (max if maximize else min)(feasible, key=lambda t: t.value)

    storage.get_best_trial = get_best_trial  # this process's storage: only the dashboard reads it
    return storage


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """One thread per request, as optuna-dashboard's own command serves (its _cli.py)."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        log.debug("%s " + format, self.address_string(), *args)


def serve(spec: str, host: str, port: int) -> None:
    """optuna-dashboard (its wsgi app) over the storage, until interrupted."""
    storage = open_study_storage(spec)
    patch_serializer()
    app = optuna_dashboard.wsgi(storage)
    with make_server(
        host, port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
    ) as server:
        log.info(
            "optuna-dashboard %s over %s on http://%s:%d/dashboard",
            optuna_dashboard.__version__,
            masked(spec),
            host,
            port,
        )
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            log.info("Stopped")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("storage", help="a journal file or an RDB URL (sqlite:///..., ...)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        serve(args.storage, args.host, args.port)
    except VaelabError as err:
        parser.exit(2, f"vaelab.dashboard: {err}\n")


if __name__ == "__main__":
    main()
