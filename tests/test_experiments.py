"""Every experiment: composes, carries its seed's settings, trains one tiny epoch end to end,
pairs with a search space that composes, and has its own `make train-<name>` and
`make sweep-<name>` targets listed by `make help`."""

import math
import subprocess
from pathlib import Path

import mlflow
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vaelab.config import build
from vaelab.train import train

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def search_space(name: str) -> str:
    """The hparams_search option an experiment names for itself (its defaults list), as Hydra
    composes it: the one place the experiment -> search space map is stated."""
    with initialize_config_dir(config_dir=str(CONF)):
        cfg = compose("train", overrides=[f"experiment={name}"], return_hydra_config=True)
    return cfg.hydra.runtime.choices["hparams_search"]


SEARCH_SPACES = {name: search_space(name) for name in EXPERIMENTS}

# One tiny epoch on the CPU: the experiment's model and loss as they are, the data shrunk.
TINY = ["trainer.epochs=1", "trainer.patience=null", "trainer.device=cpu"]
TINY_DATA = {
    "conv_lstm_vitals": ["dataset.n_patients=8", "dataset.hours=0.25", "trainer.batch_size=8"],
    # its chain from a pretrained run by name: tests/test_finetune.py
    "conv_lstm_finetune": [
        "dataset.n_patients=8",
        "dataset.hours=0.25",
        "trainer.batch_size=8",
        "trainer.init_from=null",
    ],
    "digits": ["trainer.batch_size=128"],  # 1,797 bundled vectors: the set has no size option
    "kmer_mlp": ["trainer.batch_size=32"],  # the real contig: ~218 windows of 2 kb
    "lstm_vitals_baseline": ["dataset.n_patients=24", "dataset.seq_len=48", "trainer.batch_size=8"],
    "mnist1d": ["dataset.n_samples=200", "trainer.batch_size=32"],
    "mri3d_baseline": ["dataset.n_subjects=10", "dataset.size=16", "trainer.batch_size=4"],
    "mri3d_dipvae": ["dataset.n_subjects=10", "dataset.size=16", "trainer.batch_size=4"],
    "mri3d_supervised": ["dataset.n_subjects=10", "dataset.size=16", "trainer.batch_size=4"],
    "multiscale_vitals": ["dataset.n_patients=24", "dataset.seq_len=300", "trainer.batch_size=8"],
    "quick": ["dataset.n_patients=24", "dataset.seq_len=300", "trainer.batch_size=8"],
    "vqvae_vitals": ["dataset.n_patients=24", "dataset.seq_len=128", "trainer.batch_size=8"],
}
# The end-of-run downstream report (clustering, probes, a dozen figures) costs 4-10 s a run, more
# than a tiny epoch: it runs for one experiment per data set, marked slow, and is off for the rest.
DOWNSTREAM = {
    "conv_lstm_vitals",  # vitals_windows
    "digits",
    "kmer_mlp",  # kmers: the real contig
    "mnist1d",
    "mri3d_baseline",  # volumes
    "vqvae_vitals",  # vitals_synthetic, with point-mass (quantised) latents
}
SLOW = DOWNSTREAM | {"multiscale_vitals", "mri3d_dipvae"}


def usage(name):
    """The experiment file's header comment, the lines before `defaults:`."""
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    return text.split("\ndefaults:")[0]


def swept(space):
    """{setting: Hydra sweep expression} of a search space file."""
    params = OmegaConf.load(CONF / "hparams_search" / f"{space}.yaml").hydra.sweeper.params
    return {key: str(value) for key, value in params.items()}


def make(*args):
    result = subprocess.run(
        ["make", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    return result.stdout


@pytest.mark.parametrize(
    "name",
    [
        "multiscale_vitals",
        "lstm_vitals_baseline",
        "conv_lstm_vitals",
        "kmer_mlp",
        "mri3d_baseline",
        "mri3d_dipvae",
        "vqvae_vitals",
    ],
)
def test_seed_experiments_keep_their_seeds_mean_reduced_beta(compose_config, name):
    assert compose_config([f"experiment={name}"]).loss.reduction == "mean"


def test_every_experiment_names_its_search_space_and_has_tiny_settings():
    assert EXPERIMENTS == sorted(TINY_DATA)
    for name, space in SEARCH_SPACES.items():
        assert (CONF / "hparams_search" / f"{space}.yaml").is_file(), (name, space)
    assert SEARCH_SPACES["quick"] == "quick" and SEARCH_SPACES["digits"] == "collapse"


def test_a_search_space_on_the_command_line_replaces_the_experiments_own(compose_config):
    own = compose_config(["experiment=multiscale_vitals"])
    other = compose_config(["experiment=multiscale_vitals", "hparams_search=quick"])
    assert own.sweep.kl_threshold == 1.0 and other.sweep.kl_threshold == 0.5  # quick's own


def test_the_readme_table_names_each_experiments_own_search_space():
    rows = [
        line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `")
    ]
    for name, space in SEARCH_SPACES.items():
        row = next((r for r in rows if r.startswith(f"| `{name}` |")), None)
        assert row is not None, f"README's experiments table has no row for {name}"
        assert f"`{space}`" in row.split("|")[-2], f"README names another space for {name}: {row}"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_is_overrides_with_a_usage_comment(compose_config, name):
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert "_target_" not in text  # overrides only: every object comes from a group option
    assert f"#   python -m vaelab.train experiment={name}" in usage(name)
    cfg = compose_config([f"experiment={name}"])
    if name not in ("quick", "multiscale_vitals"):  # the two older files predate make targets
        assert f"#   make train-{name}" in usage(name) and f"make sweep-{name}" in usage(name)
    assert cfg.tracking.experiment == name  # its runs group in one MLflow experiment


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_builds_with_its_search_space(compose_config, name):
    """The space composes over the experiment, every swept key exists in the composed config,
    and the loss and schedule still build (a space must not switch the schedule under keys
    the experiment set, e.g. warmup_epochs of a linear schedule into a cyclical one)."""
    space = SEARCH_SPACES[name]
    cfg = compose_config([f"experiment={name}", f"hparams_search={space}"])
    for key in swept(space):
        assert OmegaConf.select(cfg, key) is not None, f"{space} sweeps {key}, absent in {name}"
    assert cfg.sweep.objective == compose_config([f"experiment={name}"]).sweep.objective
    build(cfg.loss)  # raises if a swept or fixed key no longer fits the class
    schedule = build(cfg.schedule)
    betas = [schedule(step / 4) for step in range(4 * cfg.trainer.epochs)]
    assert min(betas) >= 0.0 and max(betas) == pytest.approx(cfg.schedule.beta)


def test_kmer_mlp_is_seed_002(compose_config, monkeypatch):
    monkeypatch.delenv("VAELAB_KMER_FASTA", raising=False)
    cfg = compose_config(["experiment=kmer_mlp"])
    assert cfg.model._target_.endswith("MLPVAE") and cfg.dataset._target_.endswith("load_kmers")
    assert list(cfg.model.hidden_dims) == [1024, 512] and cfg.model.latent_dim == 256
    assert cfg.model.dropout == 0.0 and cfg.loss.free_bits == 0.0
    assert cfg.schedule._target_.endswith("ConstantBeta")
    # seed 002's w = 0.1 multiplied a reconstruction summed over 2,772 features; vaelab's is
    # the mean, so the same balance is 0.1 / 2772
    assert cfg.schedule.beta * 2772 == pytest.approx(0.1, rel=1e-3)
    assert cfg.trainer.epochs == 100
    # the contig shipped in the package, whatever the working directory
    assert cfg.dataset.fasta == str(ROOT / "vaelab/data/bundled/ecoli_MIIJ01000039.fna.gz")
    assert Path(cfg.dataset.fasta).is_file()
    assert cfg.dataset.group_by == "window" and cfg.dataset.max_skipped_fraction == 0.5
    latent = swept("kmer")["model.latent_dim"]
    assert "64" in latent and "512" in latent


def test_kmer_mlp_reads_the_fasta_named_by_the_environment(compose_config, monkeypatch):
    monkeypatch.setenv("VAELAB_KMER_FASTA", "/data/genome.fna.gz")
    assert compose_config(["experiment=kmer_mlp"]).dataset.fasta == "/data/genome.fna.gz"


def test_conv_lstm_vitals_is_seed_003(compose_config):
    cfg = compose_config(["experiment=conv_lstm_vitals"])
    assert cfg.model._target_.endswith("ConvLSTMVAE")
    assert cfg.dataset._target_.endswith("load_vitals_windows")
    assert (cfg.dataset.window, cfg.dataset.overlap) == (256, 0.5)  # stride 128
    m = cfg.model
    assert (m.latent_dim, m.lstm_hidden, m.n_layers, m.dropout) == (32, 64, 2, 0.5)
    assert list(m.conv_channels) == [16, 32]
    t = cfg.trainer
    assert (t.epochs, t.batch_size, t.lr, t.patience) == (100, 32, 1e-3, 10)


def test_lstm_vitals_baseline_is_seed_000s_collapsing_lstm(compose_config):
    cfg = compose_config(["experiment=lstm_vitals_baseline"])
    assert cfg.model._target_.endswith("LSTMVAE")
    assert (cfg.model.latent_dim, cfg.model.hidden_dim, cfg.model.n_layers) == (32, 128, 2)
    assert cfg.schedule._target_.endswith("LinearBeta")
    assert (cfg.schedule.beta, cfg.schedule.warmup_epochs) == (0.5, 30)
    assert cfg.loss.free_bits == 2.0
    t = cfg.trainer
    assert (t.epochs, t.batch_size, t.lr, t.patience) == (150, 64, 1e-3, 30)
    assert cfg.dataset._target_.endswith("generate_vitals") and cfg.dataset.seq_len < 745


def test_lstm_baseline_and_multiscale_weigh_the_kl_alike(compose_config):
    # "The same β to compare directly" holds only if the whole KL side is the same: a summed KL
    # would weigh 32x more in one of them and tilt the comparison toward the LSTM collapsing.
    lstm = compose_config(["experiment=lstm_vitals_baseline"]).loss
    conv = compose_config(["experiment=multiscale_vitals"]).loss
    kl_side = ("free_bits", "free_bits_mode", "kl_reduction", "reduction")
    assert {key: lstm[key] for key in kl_side} == {key: conv[key] for key in kl_side}
    # seed 001: clamp(kl_bd - 2, min=0).mean(): every sample and dimension, averaged over dims
    assert (conv.free_bits_mode, conv.kl_reduction) == ("per_sample", "mean")


def test_vqvae_vitals_is_seed_000s_fallback(compose_config):
    cfg = compose_config(["experiment=vqvae_vitals"])
    assert cfg.model._target_.endswith("VQVAE") and cfg.loss._target_.endswith("VQLoss")
    assert cfg.sweep.objective == "val/codebook_usage"
    assert cfg.dataset.seq_len == 745
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.trainer.patience) == (150, 64, 30)
    keys = set(swept("vqvae"))
    assert {"model.codebook_size", "loss.commitment_cost"} <= keys
    assert not any("beta" in key or "free_bits" in key for key in keys)
    space = compose_config(["experiment=vqvae_vitals", "hparams_search=vqvae"])
    assert space.sweep.objective == "val/codebook_usage"


def test_mri3d_baseline_is_seed_004_exp1(compose_config):
    cfg = compose_config(["experiment=mri3d_baseline"])
    assert cfg.model._target_.endswith("Conv3DVAE") and cfg.loss._target_.endswith("ElboLoss")
    assert cfg.model.latent_dim == 128 and cfg.model.use_sbd is False
    assert cfg.model.posterior_logvar_min == -6.0
    assert cfg.schedule._target_.endswith("CyclicalBeta") and cfg.schedule.beta == 1.0
    assert cfg.trainer.epochs / cfg.schedule.cycle_epochs == 4 and cfg.trainer.epochs == 160
    assert (cfg.loss.free_bits, cfg.loss.free_bits_mode) == (0.1, "batch_mean")
    assert cfg.trainer.grad_clip == 5.0
    assert cfg.dataset._target_.endswith("load_volumes") and cfg.dataset.size == 32  # CPU


def test_mri3d_dipvae_is_seed_004_exp2(compose_config):
    cfg = compose_config(["experiment=mri3d_dipvae"])
    assert cfg.model._target_.endswith("Conv3DVAE") and cfg.loss._target_.endswith("DipVaeLoss")
    assert cfg.model.latent_dim == 128 and cfg.model.use_sbd is False
    loss = cfg.loss
    assert (loss.lambda_od, loss.lambda_d) == (10.0, 5.0)
    assert (loss.lambda_start_epoch, loss.lambda_annealing_epochs) == (20, 40)
    assert (loss.free_bits, loss.free_bits_mode) == (0.2, "batch_mean")
    assert cfg.schedule._target_.endswith("ConstantBeta") and cfg.schedule.beta == 1.0
    assert cfg.trainer.epochs > loss.lambda_start_epoch + loss.lambda_annealing_epochs
    assert cfg.trainer.grad_clip == 5.0 and cfg.dataset.size == 32


def test_benchmark_experiments_fit_their_data(compose_config):
    digits = compose_config(["experiment=digits"], return_hydra_config=True)
    assert digits.model._target_.endswith("MLPVAE") and digits.dataset.as_image is False
    mnist1d = compose_config(["experiment=mnist1d"], return_hydra_config=True)
    assert mnist1d.model._target_.endswith("MLPVAE")
    assert (mnist1d.dataset.n_samples, mnist1d.dataset.seed) == (5000, 42)  # Greydanus 2020
    # The Gaussian ELBO on the NLL scale: β = 1, as on every data set, and the generic space
    for cfg in (digits, mnist1d):
        assert cfg.schedule.beta == 1.0 and cfg.loss.reduction == "sum"
        assert cfg.hydra.runtime.choices["hparams_search"] == "collapse"


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in EXPERIMENTS]
)
def test_experiment_trains_one_tiny_epoch(compose_config, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # nothing may depend on running from the repository root
    downstream = f"evaluation.downstream={name in DOWNSTREAM}"
    cfg = compose_config([f"experiment={name}", *TINY, *TINY_DATA[name], downstream])
    objective = train(cfg, tmp_path / "run")
    assert math.isfinite(objective)
    client = mlflow.MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(name)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    metric = cfg.sweep.objective.replace("val/", "final/", 1)
    assert run.data.metrics[metric] == objective
    assert run.data.params["trainer.epochs"] == "1"
    if name in DOWNSTREAM:
        assert any(key.startswith("eval/") for key in run.data.metrics), sorted(run.data.metrics)
    if name == "mri3d_baseline":  # seed 004's volume quality, per modality and overall
        metrics = run.data.metrics
        assert -1 <= metrics["eval/ssim"] <= 1 and math.isfinite(metrics["eval/psnr"])
        for modality in ("t1c", "t1n", "t2f", "t2w"):
            assert f"eval/ssim_{modality}" in metrics and f"eval/psnr_{modality}" in metrics


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_make_targets_run_the_experiment_and_its_sweep(name):
    train_cmd = f".venv/bin/python -m vaelab.train experiment={name} extra=1"
    assert train_cmd in make("-n", f"train-{name}", "ARGS=extra=1").splitlines()
    sweep_cmd = f".venv/bin/python -m vaelab.train --multirun experiment={name} extra=1"
    assert sweep_cmd in make("-n", f"sweep-{name}", "ARGS=extra=1").splitlines()


def test_make_help_lists_every_target_with_the_experiments_search_space():
    lines = [line.split(maxsplit=1) for line in make("help").splitlines() if line.strip()]
    listed = {words[0]: words[1] if len(words) > 1 else "" for words in lines}
    fixed = {"run", "test", "lint", "train", "sweep", "ui", "dashboard", "bench", "clean-multirun"}
    per_experiment = {f"{verb}-{name}" for name in EXPERIMENTS for verb in ("train", "sweep")}
    assert fixed | per_experiment <= set(listed)
    for name, space in SEARCH_SPACES.items():
        assert listed[f"sweep-{name}"].endswith(f"hparams_search={space}"), listed[f"sweep-{name}"]
