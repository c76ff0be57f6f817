"""The Optuna plugin's own test suite (hydra-optuna-sweeper 1.4.0rc3), run against vaelab's
sweeper: every stock test passes with hydra/sweeper=vaelab_optuna, except where vaelab differs
on purpose (DIFFERS_ON_PURPOSE, each with its reason).

The test file comes from the plugin's sdist, fetched with pip into the git-ignored build/
folder (never copied into the repo); the sdist holds setup.py and the test file but not the
apps and configs the tests run, so vaelab's own (tests/optuna_plugin/) are laid out beside it
as the plugin's source tree. The copies of the test file and configs are switched from
`optuna` to `vaelab_optuna`; with VAELAB_STOCK_SWEEPER=1 they are not, which checks that
vaelab's apps satisfy the stock plugin (all 93 tests pass):

    VAELAB_STOCK_SWEEPER=1 .venv/bin/python -m pytest tests/test_sweeper_stock_suite.py
"""

import os
import re
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "optuna_plugin_suite"
APPS = Path(__file__).resolve().parent / "optuna_plugin"
SDIST = "hydra-optuna-sweeper==1.4.0rc3"
TEST_FILE = "tests/test_optuna_sweeper_plugin.py"
N_TESTS = 93  # in the 1.4.0rc3 test file

# The stock plugin marks a rejected result (NaN, the wrong number of values) FAILED but never
# counts it against max_failure_rate; vaelab counts every failed trial, and with its default
# budget (0.25 x n_trials=3 = 0 failures) the test's first, rejected trial stops the sweep.
BUDGET = (
    "failure budget: vaelab counts a rejected result against max_failure_rate x n_trials, "
    "the stock plugin never stops for one (vaelab's own test of a rejected result: "
    "tests/test_sweeper.py::test_a_bad_objective_fails_the_trial_without_crashing)"
)
DIFFERS_ON_PURPOSE = {
    f"{TEST_FILE}::test_rejected_result_marks_trial_failed[nan]": BUDGET,
    f"{TEST_FILE}::test_rejected_result_marks_trial_failed[wrong-number-of-values]": BUDGET,
}
# The stock sweeper's name in the test file and configs, as a sweeper choice.
STOCK_CHOICE = re.compile(r"(hydra/sweeper(?:=|: ))optuna\b")


def fetch_sdist() -> Path:
    """The plugin's sdist in build/, downloaded with pip the first time."""
    folder = BUILD / "sdist"
    found = sorted(folder.glob("hydra_optuna_sweeper-*.tar.gz"))
    if found:
        return found[0]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    result = subprocess.run(
        [*command, SDIST, "-d", str(folder), "-q"], capture_output=True, text=True, timeout=300
    )
    found = sorted(folder.glob("hydra_optuna_sweeper-*.tar.gz"))
    if result.returncode != 0 or not found:
        message = f"pip could not download the {SDIST} sdist: {result.stderr[-1000:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(
            f"{message}\nWith access to PyPI, run `.venv/bin/python -m pytest "
            f"tests/test_sweeper_stock_suite.py`, or put the sdist in {folder}."
        )
    return found[0]


def lay_out_plugin_root(sdist: Path, stock: bool) -> Path:
    """The plugin's source tree in build/: the sdist's setup.py and test file, vaelab's apps."""
    root = BUILD / ("stock" if stock else "vaelab_optuna")
    shutil.rmtree(root, ignore_errors=True)
    (root / "tests").mkdir(parents=True)
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            inner = member.name.partition("/")[2]
            if inner in ("setup.py", TEST_FILE):
                (root / inner).write_bytes(archive.extractfile(member).read())
    shutil.copytree(APPS / "example", root / "example")
    shutil.copytree(APPS / "conf", root / "tests" / "conf")
    # The suite's own rootdir: vaelab's pytest settings (pyproject.toml) stay out of it.
    (root / "pytest.ini").write_text("[pytest]\n")
    if not stock:
        switched = 0
        for path in [root / TEST_FILE, *root.glob("**/*.yaml")]:
            text, n = STOCK_CHOICE.subn(r"\1vaelab_optuna", path.read_text())
            path.write_text(text)
            switched += n
        assert switched >= 7, f"only {switched} sweeper choices switched to vaelab_optuna"
    return root


def test_the_optuna_plugins_own_suite_passes(tmp_path):
    stock = os.environ.get("VAELAB_STOCK_SWEEPER") == "1"
    root = lay_out_plugin_root(fetch_sdist(), stock)
    deselected = {} if stock else DIFFERS_ON_PURPOSE
    report = tmp_path / "report.xml"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            TEST_FILE,
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
            *(f"--deselect={test_id}" for test_id in deselected),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert report.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        verdicts = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcome = verdicts[0] if verdicts else "passed"
        outcomes[f"{TEST_FILE}::{case.get('name')}"] = outcome
    not_passed = {name: outcome for name, outcome in outcomes.items() if outcome != "passed"}
    assert not not_passed, f"{not_passed}\n{result.stdout[-5000:]}"
    assert not set(deselected) & set(outcomes)
    assert len(outcomes) == N_TESTS - len(deselected), result.stdout[-3000:]
    assert result.returncode == 0, result.stdout[-3000:]
