"""A fitted IsolationForest as plain arrays in an .npz file, scored again with numpy alone.

Seed 003 saved its anomaly detector with joblib (`anomaly_model.joblib`): loading a pickle runs
whatever code the file names. Here the forest is stored as what scoring needs, each tree's
`tree_` arrays (children_left, children_right, feature, threshold, n_node_samples), concatenated
with the offset of each tree's first node, beside `max_samples_` and `offset_`, and a JSON
provenance record (scikit-learn version, the data it was fitted on). `np.load(...,
allow_pickle=False)` reads it back, and `ExportedForest.score_samples` reproduces
`IsolationForest.score_samples` exactly, bit for bit (tests/test_risk_scores.py).

The score is the one of Liu, Ting & Zhou 2008 ("Isolation Forest", eq. 2), as scikit-learn
computes it: s(x) = 2 ** (-E[h(x)] / c(max_samples)), with h(x) the depth of the leaf x falls
in plus c(n_leaf) - 1 for the samples the leaf still held, and c(n) = 2 H(n - 1) - 2 (n - 1) / n
the average path length of an unsuccessful binary-search-tree search. scikit-learn's
`score_samples` returns -s(x); `decision_function` is score_samples - offset_.
"""

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
from sklearn.ensemble import IsolationForest

from vaelab.errors import DataError

FORMAT = "vaelab.isolation_forest/1"  # what an .npz written here says it is
_ARRAYS = ("children_left", "children_right", "feature", "threshold", "n_node_samples")
_LEAF = -1  # scikit-learn's TREE_LEAF: a node without children


def average_path_length(n: np.ndarray) -> np.ndarray:
    """c(n) of Liu et al. 2008: 0 for n <= 1, 1 for n = 2, 2 (ln(n - 1) + γ) - 2 (n - 1) / n
    above; the same expression, in the same order, as scikit-learn's `_average_path_length`,
    so that scores agree to the last bit."""
    n = np.asarray(n)
    out = np.zeros(n.shape)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


def node_depths(left: np.ndarray, right: np.ndarray, roots: np.ndarray) -> np.ndarray:
    """Depth of every node, each root at 1 (as scikit-learn's `Tree.compute_node_depths`),
    level by level from the roots."""
    depth = np.zeros(len(left), dtype=np.int64)
    level, d = np.asarray(roots), 1
    while level.size:
        depth[level] = d
        inner = level[left[level] != _LEAF]
        level, d = np.concatenate([left[inner], right[inner]]), d + 1
    return depth


@dataclass(frozen=True)
class ExportedForest:
    """The arrays of a fitted IsolationForest, every tree's nodes concatenated: tree k holds
    nodes tree_offsets[k] .. tree_offsets[k+1] - 1, and its children indices are global.
    `feature` indexes the input's columns (for a forest fitted on a feature subsample, already
    mapped back through `estimators_features_`); -2 on leaves."""

    children_left: np.ndarray  # int64, global node index, -1 on leaves
    children_right: np.ndarray
    feature: np.ndarray  # int64
    threshold: np.ndarray  # float64: go left when x[feature] (as float32) <= threshold
    n_node_samples: np.ndarray  # int64: training samples that reached the node
    tree_offsets: np.ndarray  # int64 (n_trees + 1,)
    max_samples: int  # max_samples_: the subsample size of each tree
    n_features: int
    offset: float  # offset_: decision_function = score_samples - offset
    provenance: dict[str, Any]

    @classmethod
    def from_sklearn(cls, forest: IsolationForest, provenance: dict[str, Any]) -> "ExportedForest":
        """Copy the arrays of a fitted forest; `provenance` (JSON-serialisable) goes along."""
        parts: dict[str, list[np.ndarray]] = {name: [] for name in _ARRAYS}
        offsets = [0]
        n_features = int(forest.n_features_in_)
        for tree, features in zip(forest.estimators_, forest.estimators_features_, strict=True):
            t = tree.tree_
            start = offsets[-1]
            for name in ("children_left", "children_right"):
                child = np.asarray(getattr(t, name), dtype=np.int64)
                parts[name].append(np.where(child == _LEAF, _LEAF, child + start))
            feature = np.asarray(t.feature, dtype=np.int64)
            # The trees of a forest on a feature subsample were fitted on X[:, features]
            # (sklearn BaseBagging: only when fewer features than the input holds).
            if len(features) != n_features:
                feature = np.where(feature >= 0, np.asarray(features)[feature.clip(0)], feature)
            parts["feature"].append(feature)
            parts["threshold"].append(np.asarray(t.threshold, dtype=np.float64))
            parts["n_node_samples"].append(np.asarray(t.n_node_samples, dtype=np.int64))
            offsets.append(start + t.node_count)
        return cls(
            **{name: np.concatenate(arrays) for name, arrays in parts.items()},
            tree_offsets=np.asarray(offsets, dtype=np.int64),
            max_samples=int(forest.max_samples_),
            n_features=n_features,
            offset=float(forest.offset_),
            provenance={"sklearn_version": sklearn.__version__, **provenance},
        )

    @property
    def n_trees(self) -> int:
        return len(self.tree_offsets) - 1

    @cached_property
    def _path_lengths(self) -> np.ndarray:
        """h of a sample ending in each node: its depth (root 1) + c(n_node_samples) - 1, the
        terms scikit-learn adds per tree (`_decision_path_lengths`, `_average_path_length`)."""
        roots = self.tree_offsets[:-1]
        depth = node_depths(self.children_left, self.children_right, roots)
        return depth + average_path_length(self.n_node_samples) - 1.0

    def score_samples(self, x: np.ndarray) -> np.ndarray:
        """-s(x), exactly as `IsolationForest.score_samples`: higher is more normal."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(
                f"score_samples: expected an array (N, {self.n_features}), found {x.shape}"
            )
        if not np.isfinite(x).all():
            raise ValueError("score_samples: expected finite values, found NaN or inf")
        # scikit-learn compares float32 inputs with float64 thresholds (its trees' DTYPE).
        x32 = x.astype(np.float32)
        path_of_leaf = self._path_lengths
        # Every sample descends every tree at once: one step per level (depth <= log2 of
        # max_samples, rounded up, plus one).
        node = np.broadcast_to(self.tree_offsets[:-1], (len(x), self.n_trees)).copy()
        rows = np.arange(len(x))[:, None]
        while True:
            inner = self.children_left[node] != _LEAF
            if not inner.any():
                break
            goes_left = x32[rows, self.feature[node].clip(0)] <= self.threshold[node]
            child = np.where(goes_left, self.children_left[node], self.children_right[node])
            node = np.where(inner, child, node)
        # Summed tree by tree, in the order of the forest, as scikit-learn sums them.
        depths = np.zeros(len(x))
        for k in range(self.n_trees):
            depths += path_of_leaf[node[:, k]]
        denominator = self.n_trees * average_path_length(np.array([self.max_samples]))
        # A forest of one-sample trees has c = 0: scikit-learn then scores every sample 1.
        ratio = np.divide(depths, denominator, out=np.ones_like(depths), where=denominator != 0)
        return -(2**-ratio)

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """score_samples - offset: below 0 is an outlier at the forest's contamination."""
        return self.score_samples(x) - self.offset

    def save(self, path: Path) -> None:
        """Write the .npz (atomically: a partial file, then a rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".tmp")
        with open(partial, "wb") as f:
            np.savez_compressed(
                f,
                format=np.array(FORMAT),
                provenance=np.array(json.dumps(self.provenance, sort_keys=True)),
                tree_offsets=self.tree_offsets,
                max_samples=np.array(self.max_samples),
                n_features=np.array(self.n_features),
                offset=np.array(self.offset),
                **{name: getattr(self, name) for name in _ARRAYS},
            )
        os.replace(partial, path)

    @classmethod
    def load(cls, path: Path) -> "ExportedForest":
        """Read an .npz written by `save`, without pickle; a DataError names a foreign file."""
        try:
            with np.load(path, allow_pickle=False) as f:
                if str(f["format"]) != FORMAT:
                    raise DataError(f"{path}: expected format {FORMAT}, found {f['format']}")
                return cls(
                    **{name: f[name] for name in _ARRAYS},
                    tree_offsets=f["tree_offsets"],
                    max_samples=int(f["max_samples"]),
                    n_features=int(f["n_features"]),
                    offset=float(f["offset"]),
                    provenance=json.loads(str(f["provenance"])),
                )
        except (KeyError, ValueError, OSError) as err:
            raise DataError(
                f"{path}: not an IsolationForest export ({FORMAT}): {type(err).__name__}: {err}"
            ) from err
