"""Small public benchmarks built locally, with no download: scikit-learn's 8x8 digits and MNIST-1D.

Each sample is its own group, so vaelab's group split is a plain random split here.
"""

import logging
import random

import numpy as np
from mnist1d.data import get_dataset_args, make_dataset
from sklearn.datasets import load_digits as sklearn_digits

from vaelab.data.base import SampleSet
from vaelab.errors import DataError

logger = logging.getLogger(__name__)

MNIST1D_LENGTH = 40  # samples per MNIST-1D sequence (the generator's final_seq_length)
MNIST1D_CLASSES = 10


def load_digits(as_image: bool = False) -> SampleSet:
    """scikit-learn's bundled 8x8 digits (1797 samples, gray levels 0-16, labels 0-9).

    values: (N, 64) feature vectors, or with as_image (N, 8, 8) read as sequences of T=8 rows
    with C=8 pixel columns each, for the sequence models. No generative factors are known.
    """
    bunch = sklearn_digits()  # shipped inside scikit-learn: nothing is downloaded
    images = np.asarray(bunch.images, dtype=np.float32)  # (N, 8, 8)
    n = len(images)
    ids = np.array([f"D{i:04d}" for i in range(n)])
    if as_image:
        values = images
        channel_names = [f"col{c}" for c in range(8)]
    else:
        values = images.reshape(n, 64)
        channel_names = [f"px{r}_{c}" for r in range(8) for c in range(8)]
    source = f"digits(as_image={as_image})"
    logger.info("%s: %d samples of shape %s, 10 classes", source, n, values.shape[1:])
    return SampleSet(
        values=values,
        masks=None,
        ids=ids,
        groups=ids.copy(),
        channel_names=channel_names,
        labels=np.asarray(bunch.target, dtype=np.int64),
        source=source,
    )


def load_mnist1d(n_samples: int = 4000, seed: int = 0) -> SampleSet:
    """MNIST-1D (Greydanus 2020, arXiv:2011.14439) generated here: (N, 40, 1) with labels 0-9.

    Built by the package's own `make_dataset` with `num_samples` and `seed` set, never by
    `get_dataset`, which downloads a pickle. The generator's train and test parts are joined
    (train first); vaelab's group split makes the splits. Its published numbers use
    n_samples=5000 and seed=42 (4000 train + 1000 test).
    """
    source = f"mnist1d(n_samples={n_samples}, seed={seed})"
    if isinstance(n_samples, bool) or not isinstance(n_samples, int | np.integer):
        raise DataError(f"{source}: n_samples: expected a multiple of 10, found {n_samples!r}")
    if n_samples < MNIST1D_CLASSES or n_samples % MNIST1D_CLASSES:
        # The generator makes n_samples // 10 per class: anything else would silently shrink.
        raise DataError(
            f"{source}: n_samples: expected a multiple of {MNIST1D_CLASSES} >= "
            f"{MNIST1D_CLASSES} (one tenth per digit), found {n_samples}"
        )
    args = get_dataset_args()
    args.num_samples = int(n_samples)
    args.seed = int(seed)
    # make_dataset seeds Python's and NumPy's global generators: put them back afterwards,
    # so building the data set does not reset the streams seeded at the top of the run.
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    if x.shape != (n_samples, MNIST1D_LENGTH):
        raise DataError(
            f"{source}: expected generated x of shape ({n_samples}, {MNIST1D_LENGTH}), "
            f"found {x.shape}"
        )
    ids = np.array([f"M{i:05d}" for i in range(len(x))])
    logger.info("%s: %d sequences of %d steps, 10 classes", source, len(x), MNIST1D_LENGTH)
    return SampleSet(
        values=x[:, :, None],  # (N, T=40, C=1)
        masks=None,
        ids=ids,
        groups=ids.copy(),
        channel_names=["x"],
        labels=y,
        source=source,
    )
