"""Export a finished run in seed 000's file format (its "Output artifacts").

    python -m vaelab.export multirun/runs/<date>/<time> exported/

Seed 000 names three files: `vae_latents.h5` with "mu, logvar, patient_ids", `vae_model.pt`,
"Model checkpoint", and `vae_multiscale_components.h5`, "Per-branch reconstructions (debug)".
vaelab's own files differ in their names and keys (latents.h5 has `ids` and `split`), so a reader
written for the seed could not open them. This writes the seed's files from a run folder:

- vae_latents.h5: exactly the seed's three keys, for every sample of the run (train, val and
  test, in the run's order): `mu` and `logvar`, float32 (N, latent_dim), the posterior mean
  and log-variance as latents.h5 holds them; `patient_ids`, (N,) UTF-8 strings, the run's
  sample ids (seed 000 has one sample per patient, so a sample id is the patient id). The
  file's attributes say which run it came from; nothing else is added.
- vae_model.pt: the run's best checkpoint (checkpoints/model.pt) byte for byte. The seed names
  no keys inside it; vaelab's checkpoint holds the state dict (`model`), the resolved config,
  the normaliser and the epoch, all tensors or plain values, so torch.load(weights_only=True)
  reads it, and vaelab.artifacts.load_checkpoint rebuilds the model from it.
- vae_multiscale_components.h5: the run's multiscale_components.h5 byte for byte, when the
  run has one (multi-branch models only).
"""

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from vaelab.artifacts import BEST_CHECKPOINT
from vaelab.errors import DataError

log = logging.getLogger(__name__)

SEED000_LATENTS = "vae_latents.h5"
SEED000_MODEL = "vae_model.pt"
SEED000_COMPONENTS = "vae_multiscale_components.h5"
SEED000_LATENT_KEYS = ("mu", "logvar", "patient_ids")  # seed 000: "mu, logvar, patient_ids"


def write_seed000_latents(
    path: Path, mu: np.ndarray, logvar: np.ndarray, patient_ids: Sequence[str], source: str
) -> None:
    """vae_latents.h5 with exactly the keys of seed 000 (module docstring), atomically."""
    mu, logvar = np.asarray(mu, dtype=np.float32), np.asarray(logvar, dtype=np.float32)
    if mu.ndim != 2 or mu.shape != logvar.shape or len(patient_ids) != len(mu):
        raise DataError(
            f"{source}: expected mu and logvar of one shape (N, latent_dim) and N ids, found "
            f"{mu.shape}, {logvar.shape} and {len(patient_ids)} ids"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    with h5py.File(partial, "w") as f:
        f.create_dataset("mu", data=mu)
        f.create_dataset("logvar", data=logvar)
        ids = np.asarray([str(i) for i in patient_ids], dtype=object)
        f.create_dataset("patient_ids", data=ids, dtype=h5py.string_dtype())
        f.attrs["source"] = source
        f.attrs["format"] = "seed 000 vae_latents.h5 (mu, logvar, patient_ids)"
    os.replace(partial, path)


def _copy(source: Path, target: Path) -> None:
    partial = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, partial)
    os.replace(partial, target)


def export_seed000(run_dir: Path, out_dir: Path) -> list[Path]:
    """Write a run folder's latents, checkpoint and branch file in seed 000's format into
    out_dir; return the files written."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    latents = run_dir / "latents.h5"
    checkpoint = run_dir / "checkpoints" / BEST_CHECKPOINT
    missing = [str(p) for p in (latents, checkpoint) if not p.is_file()]
    if missing:
        raise DataError(
            f"{run_dir}: not a finished vaelab run folder: {', '.join(missing)} not found"
        )
    if out_dir.resolve() == run_dir.resolve():
        raise DataError(f"{out_dir}: export into another folder than the run's own")
    try:
        with h5py.File(latents, "r") as f:
            mu, logvar = f["mu"][:], f["logvar"][:]
            ids = [s.decode() if isinstance(s, bytes) else str(s) for s in f["ids"][:]]
    except (OSError, KeyError) as err:
        raise DataError(f"{latents}: cannot read mu, logvar and ids: {err}") from err
    written = [out_dir / SEED000_LATENTS, out_dir / SEED000_MODEL]
    write_seed000_latents(written[0], mu, logvar, ids, str(run_dir))
    _copy(checkpoint, written[1])
    components = run_dir / "multiscale_components.h5"
    if components.is_file():
        written.append(out_dir / SEED000_COMPONENTS)
        _copy(components, written[-1])
    log.info(
        "Exported %d samples x latent dim %d of %s to %s",
        len(ids),
        mu.shape[1],
        run_dir,
        ", ".join(str(p) for p in written),
    )
    return written


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: python -m vaelab.export RUN_DIR OUT_DIR."""
    parser = argparse.ArgumentParser(
        prog="python -m vaelab.export",
        description="Write a run's latents and checkpoint in seed 000's format "
        "(vae_latents.h5: mu, logvar, patient_ids; vae_model.pt).",
    )
    parser.add_argument("run_dir", type=Path, help="a run folder (latents.h5, checkpoints/)")
    parser.add_argument("out_dir", type=Path, help="folder to write the seed 000 files into")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        export_seed000(args.run_dir, args.out_dir)
    except DataError as err:
        log.error("%s", err)
        sys.exit(1)


if __name__ == "__main__":
    main()
