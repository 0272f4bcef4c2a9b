"""Calibration: expected / maximum calibration error, and temperature scaling.

ECE and MCE use the top-label confidence (max probability) in equal-width bins over [0, 1]:
the usual definition (Guo et al. 2017), so numbers compare with the literature. Temperature
scaling divides the logits by one scalar T fitted on validation by minimising NLL; it changes
no ranking (AUROC) and no argmax, only how far the probabilities can be trusted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass
class Reliability:
    """Per bin (equal width over [0, 1]): mean confidence, accuracy and count."""

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray

    @property
    def ece(self) -> float:
        """Σ_b (n_b / n) |acc_b − conf_b|."""
        gap = np.nan_to_num(np.abs(self.accuracy - self.confidence))
        return float((gap * self.count).sum() / max(self.count.sum(), 1))

    @property
    def mce(self) -> float:
        """max_b |acc_b − conf_b| over non-empty bins."""
        filled = self.count > 0
        gap = np.abs(self.accuracy - self.confidence)[filled]
        return float(gap.max()) if len(gap) else 0.0


def reliability(labels: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> Reliability:
    """Bin the top-label confidence; accuracy is argmax == label within each bin."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore"):
        conf = np.bincount(which, confidence, n_bins) / count
        acc = np.bincount(which, correct.astype(float), n_bins) / count
    return Reliability(edges, conf, acc, count)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / T)."""
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64)) / temperature
    return float(F.cross_entropy(z, torch.as_tensor(np.asarray(labels), dtype=torch.long)))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 100) -> float:
    """T > 0 minimising validation NLL of softmax(logits / T); LBFGS on log T (keeps T > 0).

    Gradients are switched back on: Lightning calls test hooks under inference mode.
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _fit_temperature(logits, labels, max_iter)


def _fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int) -> float:
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not np.isfinite(temperature):
        log.warning("Temperature scaling diverged; keeping T = 1.")
        return 1.0
    if temperature > 20:
        log.warning(
            "Temperature T=%.3g: the validation logits carry almost no information (probabilities"
            " scaled towards uniform).",
            temperature,
        )
    return temperature
