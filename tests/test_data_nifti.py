"""The NIfTI reader (seed 004): a tiny folder of subjects written with nibabel loads as the
volumes reader's SampleSet, and each bad folder is one DataError naming the file."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from vaelab.config import build
from vaelab.data.nifti import load_nifti
from vaelab.errors import ConfigError, DataError

MODALITIES = ["t1", "t1ce", "t2", "flair"]
SUBJECTS = ["BraTS_002", "BraTS_001", "BraTS_010"]  # written out of order: ids come sorted


def write_nifti(path, data: np.ndarray) -> None:
    """One NIfTI file (1 mm voxels) of data."""
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


@pytest.fixture
def subjects(tmp_path):
    """<root>/<subject>/<subject>_<modality>.nii.gz for 3 subjects x 4 modalities of 8³
    voxels (one subject as .nii); returns root and the voxels written, [subject][modality]."""
    rng = np.random.default_rng(0)
    root = tmp_path / "brats"
    written = {}
    for i, subject in enumerate(SUBJECTS):
        (root / subject).mkdir(parents=True)
        ext = ".nii" if i == 2 else ".nii.gz"
        written[subject] = {}
        for k, modality in enumerate(MODALITIES):
            data = (100.0 * (k + 1) + 20.0 * rng.normal(size=(8, 8, 8))).astype(np.float32)
            write_nifti(root / subject / f"{subject}_{modality}{ext}", data)
            written[subject][modality] = data
    (root / ".cache").mkdir()  # hidden folders and loose files are not subjects
    (root / "README.txt").write_text("not a subject")
    return root, written


def test_nifti_folder_loads_as_volumes(subjects) -> None:
    root, written = subjects
    s = load_nifti(root, modalities=MODALITIES)
    assert s.values.shape == (3, 4, 8, 8, 8) and s.values.dtype == np.float32
    assert list(s.ids) == sorted(SUBJECTS) and list(s.groups) == list(s.ids)
    assert s.channel_names == MODALITIES and s.channel_axis == 1 and s.n_channels == 4
    assert s.masks is None and s.labels is None and s.source == str(root)
    # Each subject's channel is its file's voxels, z-scored over the volume (seed 004).
    for i, subject in enumerate(s.ids):
        for k, modality in enumerate(MODALITIES):
            v = written[subject][modality].astype(np.float64)
            np.testing.assert_allclose(s.values[i, k], (v - v.mean()) / v.std(), atol=1e-5)


def test_nifti_config_composes_and_builds(subjects, compose_config, conf_dir) -> None:
    root, _ = subjects
    cfg = compose_config(["dataset=nifti", f"dataset.root={root}", "dataset.crop=[8,8,8]"])
    s = build(cfg.dataset)
    assert s.sample_shape == (4, 8, 8, 8) and s.channel_names == MODALITIES
    # Every key but _target_ carries a comment (the rule of tests/test_data_configs.py).
    for line in (conf_dir / "dataset" / "nifti.yaml").read_text().splitlines():
        if line and not line.startswith(("#", " ", "_target_")):
            assert "  # " in line, line


def test_pattern_and_crop(tmp_path) -> None:
    # Another naming scheme, 4D files with a trailing axis of 1, the centre crop.
    data = np.arange(10 * 12 * 10, dtype=np.float32).reshape(10, 12, 10, 1)
    for subject in ("a", "b"):
        (tmp_path / "anat" / subject).mkdir(parents=True)
        for modality in ("T1w", "FLAIR"):
            write_nifti(tmp_path / "anat" / subject / f"{modality}.nii.gz", data + len(subject))
    s = load_nifti(
        tmp_path / "anat", modalities=["T1w", "FLAIR"], pattern="{subject}/{modality}", crop=[8] * 3
    )
    assert s.values.shape == (2, 2, 8, 8, 8) and list(s.ids) == ["a", "b"]
    centre = data[1:9, 2:10, 1:9, 0].astype(np.float64)
    # The centre voxels, z-scored over the cropped volume.
    np.testing.assert_allclose(s.values[0, 0], (centre - centre.mean()) / centre.std(), atol=1e-5)


def test_missing_modality_is_named(subjects) -> None:
    root, _ = subjects
    (root / "BraTS_002" / "BraTS_002_flair.nii.gz").unlink()
    with pytest.raises(DataError, match=r"subject 'BraTS_002': modality 'flair' not found"):
        load_nifti(root)


def test_corrupt_file_is_named(subjects) -> None:
    root, _ = subjects
    bad = root / "BraTS_001" / "BraTS_001_t2.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file at all" * 20)
    with pytest.raises(DataError, match=rf"{bad}: cannot read as NIfTI"):
        load_nifti(root)


def test_truncated_file_is_named(subjects) -> None:
    root, _ = subjects
    bad = root / "BraTS_010" / "BraTS_010_t1ce.nii"  # header intact, voxels cut short
    bad.write_bytes(bad.read_bytes()[:600])
    with pytest.raises(DataError, match=rf"{bad}: cannot read"):
        load_nifti(root)
    gz = root / "BraTS_001" / "BraTS_001_t1.nii.gz"  # a gzip stream cut short
    gz.write_bytes(gzip.compress(gzip.decompress(gz.read_bytes()))[:400])
    with pytest.raises(DataError, match=rf"{gz}: cannot read"):
        load_nifti(root)


def test_shape_mismatches_are_named(subjects) -> None:
    root, _ = subjects
    odd = root / "BraTS_010" / "BraTS_010_t2.nii"
    write_nifti(odd, np.zeros((8, 8, 9), dtype=np.float32))
    with pytest.raises(DataError, match=r"BraTS_010_t2.nii: subject 'BraTS_010', modality 't2': "):
        load_nifti(root)
    for modality in MODALITIES:  # now all of BraTS_010 is 8 x 8 x 9, unlike BraTS_001
        write_nifti(root / "BraTS_010" / f"BraTS_010_{modality}.nii", np.zeros((8, 8, 9)))
    with pytest.raises(DataError, match=r"expected the shape of subject 'BraTS_001'.*\(8, 8, 8\)"):
        load_nifti(root)


def test_nan_voxel_is_named(subjects) -> None:
    root, written = subjects
    data = written["BraTS_002"]["t1"].copy()
    data[1, 2, 3] = np.nan
    path = root / "BraTS_002" / "BraTS_002_t1.nii.gz"
    write_nifti(path, data)
    with pytest.raises(DataError, match=rf"{path}: expected finite voxels, found 1 NaN/inf"):
        load_nifti(root)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("empty", r"no subject folders found"),
        ("missing_root", r"not found \(expected a folder of subject folders\)"),
        ("both_extensions", r"expected one file, found both"),
        ("not_3d", r"expected a 3D volume"),
        ("crop_too_large", r"dataset.crop \[16, 8, 8\] is larger than the volumes"),
    ],
)
def test_bad_folders_are_one_clear_error(tmp_path, subjects, change: str, match: str) -> None:
    root, _ = subjects
    kwargs = {}
    if change == "empty":
        root = tmp_path / "empty"
        root.mkdir()
    elif change == "missing_root":
        root = tmp_path / "nowhere"
    elif change == "both_extensions":
        write_nifti(root / "BraTS_001" / "BraTS_001_t1.nii", np.zeros((8, 8, 8)))
    elif change == "not_3d":
        write_nifti(root / "BraTS_001" / "BraTS_001_t1.nii.gz", np.zeros((8, 8, 8, 2)))
    else:
        kwargs["crop"] = [16, 8, 8]
    with pytest.raises(DataError, match=match):
        load_nifti(root, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"modalities": "t1"}, r"dataset.modalities: expected a list"),
        ({"modalities": ["t1", "t1"]}, r"dataset.modalities: expected distinct"),
        ({"pattern": "{subject}/{subject}_t1"}, r"dataset.pattern: expected both"),
        ({"pattern": "{subject}/{modality}_{site}"}, r"dataset.pattern: expected only the fields"),
        ({"crop": [8, 8]}, r"dataset.crop: expected null or 3 integers"),
        ({"crop": [4, 8, 8]}, r"dataset.crop: expected every side >= 8"),
    ],
)
def test_bad_arguments_name_the_key(subjects, kwargs: dict, match: str) -> None:
    root, _ = subjects
    with pytest.raises(ConfigError, match=match):
        load_nifti(root, **kwargs)
