"""The notebooks under notebooks/ run headless against a tiny real sweep and show what they
promise: no cell fails, figures come out, and the numbers match the MLflow store."""

import sys
from pathlib import Path

import h5py
import ipykernel.kernelspec
import mlflow
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="session")
def kernel_specs(tmp_path_factory):
    """A `python3` kernel spec for this interpreter (the venv's python), installed under a
    temporary prefix and the only place looked in: a python3 spec of another Python elsewhere
    on the machine (~/.local/share/jupyter, /usr/share/jupyter) cannot shadow it."""
    prefix = tmp_path_factory.mktemp("jupyter")
    ipykernel.kernelspec.install(prefix=str(prefix), kernel_name="python3")
    return KernelSpecManager(kernel_dirs=[str(prefix / "share" / "jupyter" / "kernels")])


def execute(name: str, parameters: dict, kernel_specs, workdir: Path) -> nbformat.NotebookNode:
    """Run a copy of notebooks/<name> in memory, its parameters set after the defaults (as
    papermill's injected cell does); raises CellExecutionError at the first failing cell."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += "\n# injected by the test\n" + "\n".join(
        f"{key} = {value!r}" for key, value in parameters.items()
    )
    km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=kernel_specs)
    assert km.kernel_spec.argv[0] == sys.executable
    client = NotebookClient(nb, km=km, timeout=180, resources={"metadata": {"path": str(workdir)}})
    client.execute()
    return nb


def sweep_runs(uri: str) -> tuple[mlflow.MlflowClient, object, list]:
    """The tiny sweep's parent run and its child runs, oldest first, as MLflow holds them."""
    client = mlflow.MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    [parent] = client.search_runs(experiments, "tags.`sweep.role` = 'parent'")
    children = client.search_runs(
        experiments,
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    return client, parent, children


def outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def summary_of(nb: nbformat.NotebookNode) -> dict:
    """The summary record the notebook's last cell displays as application/json."""
    records = [
        o["data"]["application/json"]
        for o in outputs(nb)
        if "application/json" in o.get("data", {})
    ]
    assert records, "the notebook displayed no summary"
    return records[-1]


def assert_ran_with_figures(nb: nbformat.NotebookNode, at_least: int) -> None:
    everything = outputs(nb)
    assert not [o for o in everything if o.output_type == "error"]
    images = [o for o in everything if "image/png" in o.get("data", {})]
    assert len(images) >= at_least


def test_notebooks_are_committed_without_outputs_and_with_a_parameters_cell():
    expected = {
        "sweep_report.ipynb": ["TRACKING_URI", "STUDY", "EXPERIMENT"],
        "latent_explorer.ipynb": ["TRACKING_URI", "RUN_ID", "LATENTS_PATH"],
    }
    for name, parameters in expected.items():
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.outputs == [] and c.execution_count is None for c in code), name
        assert code[0].metadata.get("tags") == ["parameters"], name
        assert [c for c in code if "parameters" in c.metadata.get("tags", [])] == [code[0]]
        for parameter in parameters:
            assert f"\n{parameter} = " in f"\n{code[0].source}", (name, parameter)
        assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.parametrize("name", ["sweep_report.ipynb", "latent_explorer.ipynb"])
def test_notebooks_open_the_store_under_make_s_output_root(name, monkeypatch):
    parameters = [c for c in nbformat.read(NOTEBOOKS / name, as_version=4).cells][1]
    assert parameters.metadata.get("tags") == ["parameters"]
    found = {}
    monkeypatch.delenv("VAELAB_OUTPUT_ROOT", raising=False)
    exec(parameters.source, found)  # run from notebooks/, as Jupyter does
    assert found["TRACKING_URI"] == "sqlite:///../multirun/mlflow.db"
    for root, uri in [
        ("elsewhere", "sqlite:///../elsewhere/mlflow.db"),
        ("/data/x", "sqlite:////data/x/mlflow.db"),
    ]:
        monkeypatch.setenv("VAELAB_OUTPUT_ROOT", root)  # what `make ... OUT=root` exports
        exec(parameters.source, found)
        assert found["TRACKING_URI"] == uri


@pytest.mark.slow
def test_sweep_report_runs_on_a_tiny_sweep(tiny_sweep, kernel_specs, tmp_path):
    uri = f"sqlite:///{tiny_sweep.root}/mlflow.db"
    nb = execute(
        "sweep_report.ipynb",
        {"TRACKING_URI": uri, "STUDY": tiny_sweep.study},
        kernel_specs,
        tmp_path,
    )
    # AU per setting, KL vs AU, the best trial's history, its reconstructions
    assert_ran_with_figures(nb, at_least=4)
    summary = summary_of(nb)

    _, parent, children = sweep_runs(uri)
    assert summary["parent_run_id"] == parent.info.run_id
    assert summary["n_trials"] == tiny_sweep.n_trials == len(children)
    assert (
        summary["n_feasible"] == tiny_sweep.n_trials
    )  # kl_threshold 0: no trial can fall below it
    assert summary["best_trial"] == int(parent.data.tags["sweep.best_trial"])
    assert summary["best_run_id"] in {c.info.run_id for c in children}


@pytest.mark.slow
def test_latent_explorer_opens_the_newest_run_or_a_local_file(tiny_sweep, kernel_specs, tmp_path):
    uri = f"sqlite:///{tiny_sweep.root}/mlflow.db"
    nb = execute("latent_explorer.ipynb", {"TRACKING_URI": uri}, kernel_specs, tmp_path)
    # KL and Var(mu) per dimension, PCA by split, HDBSCAN clusters
    assert_ran_with_figures(nb, at_least=3)
    summary = summary_of(nb)

    client, _, children = sweep_runs(uri)
    newest = children[-1]  # the parent started first but has no latents.h5
    assert summary["run_id"] == newest.info.run_id
    latents = client.download_artifacts(newest.info.run_id, "latents.h5", str(tmp_path))
    with h5py.File(latents) as f:
        mu = f["mu"][()]
    assert (summary["n_samples"], summary["latent_dim"]) == mu.shape == (24, 4)
    assert summary["active_units"] == int((mu.var(axis=0) >= 0.01).sum())
    assert summary["n_clusters"] >= 0 and 0.0 <= summary["noise_fraction"] <= 1.0

    # A local file, with no store at all behind it
    local = execute(
        "latent_explorer.ipynb",
        {"TRACKING_URI": "sqlite:///nowhere/mlflow.db", "LATENTS_PATH": latents},
        kernel_specs,
        tmp_path,
    )
    assert_ran_with_figures(local, at_least=3)
    from_file = summary_of(local)
    assert from_file["run_id"] is None and from_file["source"] == str(Path(latents).resolve())
    for key in ("n_samples", "latent_dim", "active_units", "n_clusters", "noise_fraction"):
        assert from_file[key] == summary[key], key
    assert not (tmp_path / "nowhere").exists()  # no store was created at the unused URI
