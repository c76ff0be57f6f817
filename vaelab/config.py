"""What a config may build and how: the execution whitelist, `build`, the checks a run's config
passes before anything trains, the one error wrapper of every command, and the
`${vaelab.bundled:...}` resolver.

This is the bottom layer with `runtime` and `errors`: it imports nothing else of vaelab, so
every module can build from config the same way.
"""

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import execution_whitelist, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from vaelab.errors import ConfigError, VaelabError

log = logging.getLogger(__name__)

# Hydra 1.4's execution whitelist: configs and command-line overrides may instantiate only
# these targets. Anything else (os.system, subprocess.*, builtins...) is refused with a message
# naming the key. Pass it to @hydra.main; `build` applies it to every instantiate of vaelab.
TRUSTED_TARGETS: list[str] = [
    "vaelab.*",
    "torch.optim.Adam",
    "torch.optim.AdamW",
    "torch.optim.SGD",
    "optuna.pruners.*",  # sweep.pruner
]


@contextmanager
def trusted() -> Iterator[None]:
    """TRUSTED_TARGETS may be instantiated inside, and what an enclosing execution_whitelist
    allowed (a test's own model class, say); nothing else."""
    with execution_whitelist(TRUSTED_TARGETS):
        yield


def build(node: DictConfig, **runtime_kwargs: object) -> Any:
    """instantiate() under the whitelist, turning what goes wrong into one message naming the key.

    Hydra wraps an error raised by a target in an InstantiationException (or re-raises a
    TypeError for a misspelt argument, with the key in a note). A vaelab error of the target
    comes through as itself; anything else becomes a ConfigError carrying Hydra's text, which
    names the key. The full traceback stays in the log at DEBUG level.
    """
    try:
        with trusted():
            return instantiate(node, **runtime_kwargs)
    except (InstantiationException, TypeError) as err:
        if isinstance(err.__cause__, VaelabError):
            raise err.__cause__ from None
        log.debug("instantiate failed", exc_info=True)
        notes = "".join(f"\n{note}" for note in getattr(err, "__notes__", []))
        raise ConfigError(f"{err}{notes}") from err


def require_complete(cfg: DictConfig) -> None:
    """Stop with one message when a mandatory value (???) was not given."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} required: give {missing[0]}=... on the command line"
        )


def objective_names(objective: str | list[str] | ListConfig) -> list[str]:
    """`sweep.objective` as a list: one validation metric, or several for a Pareto sweep."""
    names = [objective] if isinstance(objective, str) else [str(name) for name in objective]
    wrong = [name for name in names if not name.startswith("val/")]
    if not names or wrong:
        raise ConfigError(
            f"sweep.objective must name validation metrics (val/...), got {names}: the value "
            "a run returns is measured on the validation split"
        )
    return names


# The groups of conf/train.yaml that hold one object each, built with `build`. A run checks
# them before it trains; a sweep checks them once before its first trial.
BUILT_GROUPS = (
    "model",
    "loss",
    "schedule",
    "dataset",
    "trainer",
    "tracking",
    "verdict",
    "sweep.pruner",
)
# Of those, the ones cheap enough to build as a check (the model needs the data's shape, and
# building the data set is the expensive part of a run), with stand-ins for what only the
# data can tell: a loss with a learned σ per channel is checked with one channel.
CHECK_BUILDS: dict[str, dict[str, object]] = {
    "loss": {"n_channels": 1},
    "schedule": {},
    "trainer": {},
    "tracking": {},
    "verdict": {},
    "sweep.pruner": {},
}


# When a sweep's trial makes its downstream report (evaluation.in_sweep; vaelab.report).
IN_SWEEP_CHOICES = ("deferred", "inline")


def check_run_config(cfg: DictConfig) -> None:
    """Everything about a train config that can be known wrong before any data is read.

    Mandatory values given; each built group a config node (not a value set by `group.key=x`
    where `group/key=x` was meant) whose target builds; the objective a validation metric.
    Raises one ConfigError naming the key and, where it is a known slip, the right spelling.
    """
    require_complete(cfg)
    for key in BUILT_GROUPS:
        node = OmegaConf.select(cfg, key)
        if node is None or isinstance(node, DictConfig):
            continue
        group = key.replace(".", "/")
        raise ConfigError(
            f"{key}={node!r} replaces the config group {group} with a value: to choose the "
            f"option, write {group}={node} (with a slash)"
        )
    for key, stand_ins in CHECK_BUILDS.items():
        node = OmegaConf.select(cfg, key)
        if node:
            build(node, **stand_ins)
    objective_names(cfg.sweep.objective)
    in_sweep = OmegaConf.select(cfg, "evaluation.in_sweep")
    if in_sweep is not None and in_sweep not in IN_SWEEP_CHOICES:
        raise ConfigError(
            f"evaluation.in_sweep must be one of {', '.join(IN_SWEEP_CHOICES)}, got {in_sweep!r}"
        )


F = TypeVar("F", bound=Callable[..., Any])


def exits_with_one_message(main: F) -> F:
    """Wrap a command's Hydra task: a VaelabError is logged as one message and exits 1.

    In a sweep the error goes up to the sweeper instead, which records the failed trial with
    its reason and goes on with the next one.
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except VaelabError as err:
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                raise
            log.error("%s", err)
            raise SystemExit(1) from None

    return wrapper  # type: ignore[return-value]


# Files shipped inside the package, named in configs as ${vaelab.bundled:<file name>}: a config
# cannot name a file in the package by a path relative to where the user runs, so the resolver
# turns the bare name into the absolute path of vaelab/data/bundled/<name>, which is what the
# resolved config, the MLflow params and the checkpoint then record.
BUNDLED_DIR = Path(__file__).resolve().parent / "data" / "bundled"


def bundled_path(name: str) -> str:
    """The absolute path of the bundled file `name`; ConfigError naming the ones there are."""
    path = BUNDLED_DIR / name
    if Path(name).name != name or not path.is_file():
        there = sorted(p.name for p in BUNDLED_DIR.iterdir() if p.name != "README.md")
        raise ConfigError(f"${{vaelab.bundled:{name}}}: no such bundled file; there are {there}")
    return str(path)


# omegaconf 2.4 (with Hydra 1.4) deprecates register_new_resolver for this name.
OmegaConf.register_resolver("vaelab.bundled", bundled_path, replace=True)
