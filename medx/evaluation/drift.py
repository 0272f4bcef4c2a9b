"""Is a set of new images from the distribution a model was validated on? The statistics.

What a model keeps (`ShiftReference`, on its card as `shift_reference`) is a compact picture of
its VALIDATION images in its own feature space: the penultimate-layer features (what its head
reads, `ClassificationModule.embed`) reduced by PCA to `k` components, plus the residual
outside them; a capped sample of val images in that space; and their scores. Validation is
split in two halves: PCA (mean, components, scales) is fitted on one, the reference sample
and the out-of-distribution threshold come from the other, so the reference is exchangeable
with new in-distribution images (a PCA fitted on the very points it projects would make
them look tighter than any new image, and the test would cry wolf).

Two questions are answered in that space of `k + 1` standardised coordinates (the PCA scores
divided by their val scale, and the residual norm divided by its val RMS):

- **Has the distribution moved?** (a batch, a folder, a window of recent requests): the
  kernel two-sample test of Gretton et al. (JMLR 2012), maximum mean discrepancy with a
  Gaussian kernel whose bandwidth is the median distance in the reference (fixed at fit time),
  its p-value from a permutation test (exact under exchangeability); and a two-sample
  Kolmogorov-Smirnov test of the model's scores against val's, because a shift the features
  barely show can still move the scores across the threshold (blur did, on Kermany). The
  verdict combines the two by Bonferroni, p = min(1, 2 min(p_features, p_scores)), so an
  in-distribution batch is flagged with probability at most `significance`. A change of the
  case mix (more positives) also moves the scores: `feature_p` and `score_p` say which test
  fired. The effect size is MMD² in units of the permutation null's standard deviation
  (`effect`); `ood_rate` is the share of images past the OOD threshold (1% expected).
- **Is this one image unusual?**: its out-of-distribution score, the mean square of its
  `k + 1` coordinates (Hotelling's T² plus the squared PCA residual, as in PCA process
  monitoring; about 1 for a typical val image), flagged above the `ood_quantile` (99%) of the
  held-out val half.

Libraries weighed (issue 23): alibi-detect 0.13 has this MMD test but pins numpy < 2 and pulls
in transformers, numba and opencv-python (a second OpenCV); frouros 0.9 pins numpy < 2.2 and
scipy < 1.15 (both older than medx's) and matplotlib; torchdrift 0.1 has had no release since
2021; pytorch-ood 0.4 is light and maintained but scores single images with detectors fitted
on a loader, holds no two-sample test, and its fitted detectors are objects, not plain values
a checkpoint can carry under `weights_only=True`. The test is some 30 lines of NumPy, so it is
written here.

Arrays are stored as base64 of little-endian float16 (float32 for the scores) with their
shape: a resnet18 reference (512-D features, k = 16, 256 points) is about 45 kB, readable
with NumPy alone.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from scipy import stats

log = logging.getLogger(__name__)

VERSION = 1
COMPONENTS = 16  # PCA dimensions kept (fewer when val or the features are smaller)
MAX_POINTS = 400  # reference sample kept on the card
MIN_VAL_IMAGES = 20  # below this, no reference: PCA and the threshold would be noise
OOD_QUANTILE = 0.99
SIGNIFICANCE = 0.01  # the monitor's alarm level: 1% of in-distribution batches flagged
PERMUTATIONS = 1000
MAX_TESTED = 1000  # new images in the feature test: a random sample of this many when more


def encode(array: np.ndarray, dtype: str = "float16") -> dict[str, Any]:
    """A plain, JSON-able form of an array: {"dtype", "shape", "base64"}."""
    data = np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<"))
    return {"dtype": dtype, "shape": list(data.shape), "base64": base64.b64encode(data).decode()}


def decode(entry: dict[str, Any]) -> np.ndarray:
    raw = base64.b64decode(entry["base64"])
    dtype = np.dtype(entry["dtype"]).newbyteorder("<")
    return np.frombuffer(raw, dtype).reshape(entry["shape"]).astype(np.float64)


@dataclass
class ShiftReport:
    """A two-sample test of new images against the reference.

    Attributes:
        images: how many new images were tested.
        p_value: the verdict's p-value: Bonferroni of `feature_p` and `score_p` (small: the
            images differ from val).
        shifted: the verdict, `p_value < significance`.
        feature_p: permutation p-value of MMD² of the features.
        mmd2: the (biased) MMD² statistic.
        effect: MMD² in standard deviations of the permutation null (about 0 without shift).
        ood_rate: share of the new images whose own OOD score passes the threshold.
        score_ks, score_p: Kolmogorov-Smirnov statistic and p-value of the model's scores
            against val's (a case-mix change moves these too).
        significance: the alarm level the verdict used.
        feature_images: how many of the images the feature test compared: all of them, or
            a random MAX_TESTED when there are more (the reference holds at most
            MAX_POINTS, so more new images add little power and the kernel matrix grows with
            their square); the score test and `ood_rate` use every image.
    """

    images: int
    p_value: float
    shifted: bool
    feature_p: float
    mmd2: float
    effect: float
    ood_rate: float
    score_ks: float | None
    score_p: float | None
    significance: float
    feature_images: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for a command's summary."""
        verdict = "SHIFT" if self.shifted else "no shift detected"
        scores = "" if self.score_p is None else f", scores p = {self.score_p:.3g}"
        sampled = self.feature_images is not None and self.feature_images < self.images
        of = f" (a random {self.feature_images})" if sampled else ""
        return (
            f"shift monitor: {verdict} (p = {self.p_value:.3g} over {self.images} images: "
            f"features p = {self.feature_p:.3g}{of}, effect {self.effect:.1f} sd{scores}; "
            f"{self.ood_rate:.0%} of images out of distribution)"
        )


@dataclass
class ShiftReference:
    """What a model keeps of its validation images to recognise a shift (see the module doc).

    `to_dict`/`from_dict` give the card's plain entry (`card["shift_reference"]`).
    """

    mean: np.ndarray  # (D,) feature mean of the PCA half
    components: np.ndarray  # (k, D) orthonormal rows
    scales: np.ndarray  # (k,) standard deviation of each component (PCA half)
    residual_rms: float  # RMS norm of the residual outside the k components (PCA half)
    points: np.ndarray  # (n, k + 1) standardised coordinates of the reference half
    scores: np.ndarray  # (n,) the model's score of each reference image
    bandwidth: float  # Gaussian kernel bandwidth: median pairwise distance of `points`
    ood_threshold: float  # OOD score at `ood_quantile` of the reference half
    ood_quantile: float = OOD_QUANTILE
    info: dict[str, Any] = field(default_factory=dict)  # provenance: images, date, feature

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        scores: np.ndarray,
        components: int = COMPONENTS,
        max_points: int = MAX_POINTS,
        seed: int = 0,
        **info: Any,
    ) -> ShiftReference:
        """The reference from val features (n, D) and scores (n,): PCA on a random half, the
        reference sample (at most `max_points`) and the OOD threshold from the other.

        Args:
            features: the validation images' penultimate-layer features (n, D).
            scores: the model's raw score of each (p(class 1), or the top probability).
            components: PCA components kept (fewer when val or D is smaller).
            max_points: reference images kept on the card.
            seed: the random split of val into halves.
            **info: provenance kept in `info` (e.g. `fitted_on="val"`).

        Raises:
            ValueError: fewer than MIN_VAL_IMAGES images.
        """
        features = np.asarray(features, dtype=np.float64)
        scores = np.asarray(scores, dtype=np.float64)
        n, dim = features.shape
        if n < MIN_VAL_IMAGES:
            raise ValueError(f"{n} validation images; a shift reference needs {MIN_VAL_IMAGES}")
        order = np.random.default_rng(seed).permutation(n)
        fit_half, ref_half = order[: n // 2], order[n // 2 :][:max_points]
        x = features[fit_half]
        mean = x.mean(0)
        k = max(1, min(components, len(fit_half) - 1, dim))
        vt = np.linalg.svd(x - mean, full_matrices=False)[2]
        # stored as float16: quantise first, so the reference is computed with what is stored
        mean, basis = _f16(mean), _f16(vt[:k])
        coords, residual = _project(x, mean, basis)
        scales = np.maximum(coords.std(0), 1e-6)
        residual_rms = max(float(np.sqrt(np.mean(residual**2))), 1e-6)
        ref = cls(mean, basis, _f32(scales), residual_rms, np.empty((0, k + 1)), scores, 1.0, 0.0)
        points = _f16(ref.coordinates(features[ref_half]))
        distances = _pairwise(points, points)[np.triu_indices(len(points), 1)]
        ref.points, ref.scores = points, _f32(scores[ref_half])
        ref.bandwidth = max(float(np.median(np.sqrt(distances))), 1e-6)
        ref.ood_threshold = float(np.quantile(ood_score(points), OOD_QUANTILE))
        ref.info = {
            "images": int(n),
            "pca_images": len(fit_half),
            "reference_images": len(ref_half),
            "components": int(k),
            "feature_dim": int(dim),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            **info,
        }
        return ref

    def coordinates(self, features: np.ndarray) -> np.ndarray:
        """(n, k + 1) standardised coordinates: PCA scores / scale, residual norm / RMS."""
        coords, residual = _project(np.asarray(features, np.float64), self.mean, self.components)
        return np.column_stack([coords / self.scales, residual / self.residual_rms])

    def ood(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per image: (OOD score, flag: score above the val threshold)."""
        score = ood_score(self.coordinates(features))
        return score, score > self.ood_threshold

    def test(
        self,
        features: np.ndarray,
        scores: np.ndarray | None = None,
        significance: float = SIGNIFICANCE,
        permutations: int = PERMUTATIONS,
        seed: int = 0,
    ) -> ShiftReport:
        """Two-sample test of new images' features (n, D) (and scores) against the reference.

        Args:
            features: the new images' penultimate-layer features (n, D), n >= 2.
            scores: their raw scores, as the reference's (None: the feature test alone).
            significance: the alarm level of the verdict.
            permutations: of the MMD test (p-value resolution 1 / (1 + permutations)).
            seed: of the permutations (and of the sample when there are more than
                MAX_TESTED images).
        """
        return self.test_coordinates(
            self.coordinates(features), scores, significance, permutations, seed
        )

    def test_coordinates(
        self,
        new: np.ndarray,
        scores: np.ndarray | None = None,
        significance: float = SIGNIFICANCE,
        permutations: int = PERMUTATIONS,
        seed: int = 0,
        max_tested: int = MAX_TESTED,
    ) -> ShiftReport:
        """`test` of images already in the reference's coordinates (`coordinates`, (n, k + 1)):
        what a folder's images are kept as while they stream past (17 numbers an image)."""
        new = np.atleast_2d(np.asarray(new, np.float64))
        if len(new) < 2:
            raise ValueError("the two-sample test needs at least 2 new images")
        tested = new
        if len(new) > max_tested:
            chosen = np.random.default_rng(seed).choice(len(new), max_tested, replace=False)
            tested = new[np.sort(chosen)]
        p, mmd2, effect = mmd_test(self.points, tested, self.bandwidth, permutations, seed)
        ks = (
            stats.ks_2samp(self.scores, np.asarray(scores, np.float64))
            if scores is not None and len(scores)
            else None
        )
        combined = p if ks is None else min(1.0, 2 * min(p, float(ks.pvalue)))
        return ShiftReport(
            images=len(new),
            p_value=combined,
            shifted=bool(combined < significance),
            feature_p=p,
            mmd2=mmd2,
            effect=effect,
            ood_rate=float(np.mean(ood_score(new) > self.ood_threshold)),
            score_ks=None if ks is None else float(ks.statistic),
            score_p=None if ks is None else float(ks.pvalue),
            significance=significance,
            feature_images=len(tested),
        )

    def to_dict(self) -> dict[str, Any]:
        """The card entry: plain values only (weights_only checkpoints, JSON)."""
        return {
            "version": VERSION,
            "method": "MMD permutation test on PCA of penultimate features (medx.evaluation.drift)",
            "mean": encode(self.mean),
            "components": encode(self.components),
            "scales": encode(self.scales, "float32"),
            "residual_rms": float(self.residual_rms),
            "points": encode(self.points),
            "scores": encode(self.scores, "float32"),
            "bandwidth": float(self.bandwidth),
            "ood_threshold": float(self.ood_threshold),
            "ood_quantile": float(self.ood_quantile),
            "info": dict(self.info),
        }

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> ShiftReference:
        if entry.get("version") != VERSION:
            raise ValueError(
                f"shift reference version {entry.get('version')} (this medx: {VERSION})"
            )
        return cls(
            mean=decode(entry["mean"]),
            components=decode(entry["components"]),
            scales=decode(entry["scales"]),
            residual_rms=float(entry["residual_rms"]),
            points=decode(entry["points"]),
            scores=decode(entry["scores"]),
            bandwidth=float(entry["bandwidth"]),
            ood_threshold=float(entry["ood_threshold"]),
            ood_quantile=float(entry.get("ood_quantile", OOD_QUANTILE)),
            info=dict(entry.get("info") or {}),
        )


def reference_scores(probs: np.ndarray) -> np.ndarray:
    """What the reference keeps of each image's softmax probabilities (n, classes), and what
    new images are compared on: p(class 1) of a binary model, else the top probability."""
    return probs[:, 1] if probs.shape[1] == 2 else probs.max(1)


def ood_score(coordinates: np.ndarray) -> np.ndarray:
    """Mean square of the standardised coordinates: T² plus squared residual, over k + 1."""
    return np.mean(np.asarray(coordinates) ** 2, axis=1)


def mmd_test(
    x: np.ndarray, y: np.ndarray, bandwidth: float, permutations: int = PERMUTATIONS, seed: int = 0
) -> tuple[float, float, float]:
    """(p-value, MMD², effect in null sd) of samples x (m, d) and y (n, d), Gaussian kernel.

    MMD² (biased, V-statistic) = aᵀKa with a = 1/m on x and -1/n on y over the pooled kernel
    matrix K; every permutation relabels the pool, all of them in one matrix product.
    """
    pooled = np.vstack([x, y])
    kernel = np.exp(-_pairwise(pooled, pooled) / (2 * bandwidth**2))
    m, n = len(x), len(y)
    sign = np.r_[np.full(m, 1 / m), np.full(n, -1 / n)]
    rng = np.random.default_rng(seed)
    weights = np.column_stack([sign] + [rng.permutation(sign) for _ in range(permutations)])
    values = np.einsum("ip,ip->p", kernel @ weights, weights)
    observed, null = float(values[0]), values[1:]
    p = (1 + np.sum(null >= observed)) / (1 + permutations)
    effect = (observed - null.mean()) / max(float(null.std()), 1e-12)
    return float(p), observed, float(effect)


def _project(x: np.ndarray, mean: np.ndarray, basis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PCA scores (n, k) and the norm of what they leave out (n,)."""
    centred = x - mean
    coords = centred @ basis.T
    residual = np.linalg.norm(centred - coords @ basis, axis=1)
    return coords, residual


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (len(a), len(b))."""
    sq = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T
    return np.maximum(sq, 0.0)


def _f16(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(np.float16).astype(np.float64)


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(np.float32).astype(np.float64)
