"""Find the photo that probably shows someone else."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from idto3d.identity.embedder import identity_distance, l2_normalise


@dataclass
class OutlierReport:
    loo_distance: np.ndarray   # [N] distance of each photo to the mean of the others (N >= 3), pair distance (N = 2)
    outlier: np.ndarray        # [N] bool; only set for N >= 3
    pair_mismatch: bool        # N = 2 and the two photos are farther apart than the threshold
    majority: bool             # outliers are a strict minority, so dropping them is well defined


def leave_one_out_distances(embeddings: np.ndarray) -> np.ndarray:
    """Distance of each embedding to the normalised mean of the others; [N] (NaN for N = 1)."""
    e = l2_normalise(embeddings)
    n = e.shape[0]
    if n == 1:
        return np.array([np.nan], dtype=np.float32)
    total = e.sum(0)
    others = (total[None, :] - e) / (n - 1)
    return identity_distance(e, others).astype(np.float32)


def find_outliers(embeddings: np.ndarray, threshold: float) -> OutlierReport:
    """Leave-one-out test for N >= 3; for N = 2 only a mismatch between the pair can be reported."""
    n = embeddings.shape[0]
    loo = leave_one_out_distances(embeddings)
    if n < 3:
        mismatch = bool(n == 2 and loo[0] > threshold)
        return OutlierReport(loo, np.zeros(n, dtype=bool), mismatch, False)
    outlier = loo > threshold
    return OutlierReport(loo, outlier, False, bool(outlier.sum() * 2 < n))
