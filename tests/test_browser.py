"""What a researcher sees in a browser, over one tiny sweep with a feasible and an infeasible
trial: the MLflow runs table of the sweep's trials (the saved view the sweep writes, AU and KL
as columns), the parent run's description, and optuna-dashboard's study page (an infeasible
trial shown as one) and trial table, in headless Chromium driven by Selenium.

Skipped, saying why, without Chromium and its driver (Debian: apt-get install chromium
chromium-driver) or the selenium package (pip install -e '.[dev]'). The test saves its
screenshots in $VAELAB_SCREENSHOTS when set. The README's screenshots of a real sweep come
from the same functions, with `make ui` and `make dashboard` started on its output root:

    .venv/bin/python tests/test_browser.py --out screenshots --root multirun --study quick
"""

import argparse
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import api, run_one_feasible_one_infeasible, serving

from vaelab.sweep.record import view_key
from vaelab.tracking import MODEL_TRAINING, runs_table_url

pytest.importorskip("selenium", reason="the selenium package is missing: pip install -e '.[dev]'")
from selenium import webdriver  # noqa: E402 (after the skip)
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

log = logging.getLogger(__name__)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# Headless, and nothing that reaches beyond 127.0.0.1 (updates, sync, QUIC probes); a fresh
# profile, so no view or "Model training" switch remembered from an earlier visit.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1000",
]
PAGE_SECONDS = 90  # a page's first paint on 2 busy cores takes 5-20 s
STUDY = "browser"
# Buttons that cover the runs table in a screenshot: MLflow 3.17's assistant panel and the
# banner saying a shared view is shown (MLflow UI component ids).
CLOSE_BUTTONS = ["mlflow.assistant.chat_panel.close", "mlflow.experiment_page.shared_view.dismiss"]

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
    reason=f"no Chromium and chromedriver at {CHROMIUM}, {CHROMEDRIVER}: "
    "apt-get install chromium chromium-driver",
)


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[webdriver.Chrome]:
    """Headless Chromium with a fresh profile in `profile`, driven by Debian's chromedriver
    (no driver or browser download)."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def page_text(driver: webdriver.Chrome, url: str, expected: list[str]) -> str:
    """Open url and wait until its text shows every expected string; the text. A timeout
    names the strings that never appeared and what the page showed."""
    driver.get(url)

    def shown(driver: webdriver.Chrome) -> str | bool:
        text = driver.find_element(By.TAG_NAME, "body").text
        return text if all(e in text for e in expected) else False

    try:
        return WebDriverWait(driver, PAGE_SECONDS, poll_frequency=0.5).until(shown)
    except TimeoutException:
        text = driver.find_element(By.TAG_NAME, "body").text
        missing = [e for e in expected if e not in text]
        raise AssertionError(f"{url} never showed {missing}; it showed:\n{text[:2000]}") from None


def close_overlays(driver: webdriver.Chrome) -> None:
    """Click away what covers the runs table (the assistant panel, the shared-view banner)."""
    for component in CLOSE_BUTTONS:
        for button in driver.find_elements(By.CSS_SELECTOR, f"[data-component-id='{component}']"):
            with contextlib.suppress(Exception):  # gone or hidden already: nothing to close
                button.click()


def sweep_pages(ports: dict[str, int], study: str) -> dict[str, str]:
    """The pages of a sweep: its runs table and parent run in the MLflow UI, its study page and
    trial table in optuna-dashboard; `names` holds its child runs' names (';'-joined)."""
    ui, board = f"http://127.0.0.1:{ports['ui']}", f"http://127.0.0.1:{ports['dashboard']}"
    # The sweep's parent run, in whichever experiment it is (tracking.experiment).
    experiments = api(ports["ui"], "/api/2.0/mlflow/experiments/search", {"max_results": 1000})
    search = {"experiment_ids": [e["experiment_id"] for e in experiments["experiments"]]}
    search["max_results"] = 1000
    parent_filter = f"tags.`sweep.role` = 'parent' and tags.`sweep.study_name` = '{study}'"
    [parent] = api(ports["ui"], "/api/2.0/mlflow/runs/search", search | {"filter": parent_filter})[
        "runs"
    ]
    parent_id, experiment_id = parent["info"]["run_id"], parent["info"]["experiment_id"]
    search["experiment_ids"] = [experiment_id]
    child_filter = f"tags.mlflow.parentRunId = '{parent_id}'"
    children = api(ports["ui"], "/api/2.0/mlflow/runs/search", search | {"filter": child_filter})
    names = sorted(run["info"]["run_name"] for run in children.get("runs", []))
    studies = api(ports["dashboard"], "/api/studies")["study_summaries"]
    [study_id] = [s["study_id"] for s in studies if s["study_name"] == study]
    return {
        "runs_table": runs_table_url(experiment_id, view_key(study), base_url=ui),
        "parent_run": f"{ui}/#/experiments/{experiment_id}/runs/{parent_id}?{MODEL_TRAINING}",
        "dashboard": f"{board}/dashboard/studies/{study_id}",
        "trial_table": f"{board}/dashboard/studies/{study_id}/smartSelection",
        "names": ";".join(names),
    }


def take_screenshots(
    driver: webdriver.Chrome, pages: dict[str, str], out: Path
) -> dict[str, tuple[str, str]]:
    """Each page of sweep_pages as out/<page>.png, once it shows what it should; where each
    page landed (its URL after the app's redirects) and its text, for the caller to check."""
    out.mkdir(parents=True, exist_ok=True)
    names = pages["names"].split(";")
    expected = {
        "runs_table": [*names, "final/active_units", "final/kl"],
        "parent_run": ["Best", "Every trial in the runs table"],
        "dashboard": ["Best Trial", "History"],
        "trial_table": ["Include Infeasible trials", "Number", "State"],
    }
    seen = {}
    for page, wanted in expected.items():
        # The trial table is below the parallel coordinates and the history: a taller window.
        driver.set_window_size(1600, 1700 if page == "trial_table" else 1000)
        text = page_text(driver, pages[page], wanted)
        seen[page] = driver.current_url, text
        if page == "runs_table":
            close_overlays(driver)
        driver.save_screenshot(str(out / f"{page}.png"))
        log.info("%s: %s", out / f"{page}.png", pages[page])
    return seen


@pytest.mark.slow
def test_a_browser_shows_the_sweeps_trials_and_which_are_feasible(sweeps, tmp_path):
    run_one_feasible_one_infeasible(sweeps, STUDY)
    root = tmp_path / "multirun"
    out = Path(os.environ.get("VAELAB_SCREENSHOTS") or tmp_path / "screenshots")
    targets = {"ui": {"OUT": root}, "dashboard": {"OUT": root, "STUDY": STUDY}}
    with serving(targets, tmp_path) as ports, chromium(tmp_path / "profile") as driver:
        pages = sweep_pages(ports, STUDY)
        seen = take_screenshots(driver, pages, out)

    assert pages["names"].split(";") == [f"{STUDY}-0000", f"{STUDY}-0001"]
    # The runs table opens on the trials (not MLflow's GenAI overview), in the sweep's view.
    landed, text = seen["runs_table"]
    assert "/runs?" in landed and "workflowType=machine_learning" in landed
    assert f"sweep {STUDY}" in text and "2 matching runs" in text
    assert "Best feasible trial" in seen["parent_run"][1]
    # optuna-dashboard tells the infeasible trial apart (its timeline's "Infeasible" bar) and
    # names the objective.
    _, text = seen["dashboard"]
    assert "Infeasible" in text and "val/active_units" in text
    assert all((out / f"{page}.png").stat().st_size > 10_000 for page in seen)


def main() -> None:
    """Screenshots of a sweep for the README: start `make ui` and `make dashboard` on its
    output root, take them, stop both."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    parser.add_argument("--root", type=Path, default=Path("multirun"), help="the sweep's OUT")
    parser.add_argument("--study", default="quick", help="the sweep's study name")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = args.root.absolute()
    targets = {"ui": {"OUT": root}, "dashboard": {"OUT": root, "STUDY": args.study}}
    with tempfile.TemporaryDirectory() as scratch:
        with serving(targets, Path(scratch)) as ports, chromium(Path(scratch) / "p") as driver:
            take_screenshots(driver, sweep_pages(ports, args.study), args.out)


if __name__ == "__main__":
    main()
