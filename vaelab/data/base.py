"""The one in-memory form every data set takes before splitting and normalisation."""

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SampleSet:
    """All samples of a data set, in memory, before splitting and normalisation.

    values:   float32, (N, T, C) for sequences, (N, F) for feature vectors, or (N, C, D, H, W)
              for volumes (channel-first, see channel_axis). Unobserved entries may hold
              anything finite; masks say which entries are real.
    masks:    float32 of the same shape as values (1 = observed), or None when all are.
    ids:      str (N,), one name per sample.
    groups:   str (N,), the patient (or subject) each sample belongs to: splits never put one
              group in two splits. Equal to ids when each patient has one sample.
    channel_names: names of the channel axis (vitals for sequences, features for vectors,
              modalities for volumes).
    labels:   (N,) class labels where the data has them, else None.
    factors:  known generative factors of synthetic data, name -> (N,) float array.
    source:   where the samples came from, for messages ("file.h5", "vitals_synthetic(seed=0)").
    feature_groups: named ranges [start, stop) of the last axis whose reconstruction error is
              reported on its own (seed 002: one per k-mer size).
    unnormalised_channels: channel names the train-fitted normaliser leaves as they are (mean
              0, std 1), for channels already on a fixed scale: sin/cos time of day (seed 003).
    channel_axis: the axis of `values` (sample axis 0 included) that holds the channels, which
              the normaliser z-scores one by one: -1 (last) for (N, T, C) and (N, F); 1 for
              channel-first volumes (N, C, D, H, W).
    """

    values: np.ndarray
    masks: np.ndarray | None
    ids: np.ndarray
    groups: np.ndarray
    channel_names: list[str]
    labels: np.ndarray | None = None
    factors: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = ""
    # False when the names above were made up (a file without vital_index): then they say
    # nothing about which channel is which, and are not compared with a model's.
    channel_names_given: bool = True
    feature_groups: dict[str, tuple[int, int]] = field(default_factory=dict)
    unnormalised_channels: tuple[str, ...] = ()
    channel_axis: int = -1

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample: (T, C), (F,) or (C, D, H, W)."""
        return tuple(self.values.shape[1:])

    @property
    def n_channels(self) -> int:
        """Length of the channel axis: what a per-channel decoder σ or normaliser has one of."""
        return self.values.shape[self.channel_axis]

    def __len__(self) -> int:
        return len(self.values)
