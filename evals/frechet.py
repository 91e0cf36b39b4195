"""The Fréchet distance between Gaussians, and float64 feature statistics (FID and FVD share both)."""
from __future__ import annotations

import numpy as np
import scipy.linalg
import torch


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

    For symmetric PSD covariances Tr (S1 S2)^(1/2) = sum sqrt(eig(R S2 R)) with R = S1^(1/2), so two
    symmetric eigendecompositions replace a general matrix square root: stable, real, and much
    faster than scipy.linalg.sqrtm at 2048 dimensions. Rank-deficient covariances (fewer samples
    than features) give tiny negative eigenvalues, clipped to 0; if an eigensolver fails, eps*I is
    added to both covariances, as the reference TF/pytorch-fid implementations do.
    """
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"feature statistics do not match: means {mu1.shape} vs {mu2.shape}, "
                         f"covariances {s1.shape} vs {s2.shape} (different extractors?)")
    if not (np.isfinite(mu1).all() and np.isfinite(mu2).all() and np.isfinite(s1).all() and np.isfinite(s2).all()):
        raise FloatingPointError("non-finite feature statistics: the extractor or its input is broken")
    return FrechetReference(mu2, s2, eps).distance(mu1, s1)


class FrechetReference:
    """One side of the distance, fixed (the real data): its covariance's square root is computed
    once, so each further distance costs two matrix products and one eigvalsh."""

    def __init__(self, mu, sigma, eps: float = 1e-6, rows=None):
        self.mu = np.asarray(mu, np.float64).ravel()
        self.sigma = np.atleast_2d(np.asarray(sigma, np.float64))
        self.eps = eps
        try:
            if rows is not None and 1 < len(rows) < len(self.mu):
                self.root = _low_rank_sqrt(np.asarray(rows, np.float64) - self.mu)
            else:
                self.root = _psd_sqrt(self.sigma)
        except np.linalg.LinAlgError:
            self.root = _psd_sqrt(self.sigma + np.eye(len(self.mu)) * eps)

    def distance(self, mu, sigma, rows=None) -> float:
        """Distance to N(mu, sigma); `rows`, the features sigma came from, make it cheap when there
        are fewer of them than dimensions: the nonzero eigenvalues of R S R are those of the small
        Gram matrix (A R)(A R)^T / (n - 1), A the centred rows."""
        mu, s = np.asarray(mu, np.float64).ravel(), np.atleast_2d(np.asarray(sigma, np.float64))
        if mu.shape != self.mu.shape or s.shape != self.sigma.shape:
            raise ValueError(f"feature statistics do not match: {mu.shape[0]} vs {self.mu.shape[0]} features "
                             f"(different extractors?)")
        try:
            if rows is not None and 1 < len(rows) < len(mu):
                ar = (np.asarray(rows, np.float64) - mu) @ self.root
                tr_covmean = _trace_sqrt(ar @ ar.T / (len(rows) - 1))
            else:
                tr_covmean = _trace_sqrt(self.root @ s @ self.root)
        except np.linalg.LinAlgError:
            tr_covmean = _trace_sqrt(self.root @ (s + np.eye(len(mu)) * self.eps) @ self.root)
        diff = mu - self.mu
        return float(diff @ diff + np.trace(s) + np.trace(self.sigma) - 2 * tr_covmean)


def _clip(w: np.ndarray) -> np.ndarray:
    # Eigenvalues within rounding of zero are zero: their square roots (1e-8 from 1e-16) would
    # otherwise add up over thousands of null directions of a rank-deficient covariance.
    tol = max(w.max(initial=0.0), 0.0) * len(w) * np.finfo(np.float64).eps
    return np.where(w > tol, w, 0.0)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = scipy.linalg.eigh((a + a.T) / 2, driver="evd")
    return (v * np.sqrt(_clip(w))) @ v.T


def _low_rank_sqrt(a: np.ndarray) -> np.ndarray:
    """sqrt(B^T B) for B = a / sqrt(n - 1), from the n x n Gram matrix: B^T U L^(-1/2) U^T B."""
    b = a / np.sqrt(len(a) - 1)
    w, u = scipy.linalg.eigh(b @ b.T)
    keep = _clip(w) > 0
    u, w = u[:, keep], w[keep]
    return b.T @ ((u / np.sqrt(w)) @ u.T) @ b


def _trace_sqrt(m: np.ndarray) -> float:
    w = scipy.linalg.eigvalsh((m + m.T) / 2, driver="evd")
    return float(np.sqrt(_clip(w)).sum())


class FeatureStats:
    """Running mean and covariance of feature rows, accumulated in float64."""

    def __init__(self, dim: int):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)
        self.kept = []  # the rows themselves while there are fewer than dim (see FrechetReference)

    def update(self, feats: torch.Tensor) -> None:
        f = feats.detach().to("cpu", torch.float64).reshape(feats.shape[0], -1)
        if not torch.isfinite(f).all():
            raise FloatingPointError("non-finite features: the extractor or its input is broken")
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f
        self.kept = keep_rows(self.kept, f, self.n, len(self.sum))

    def state(self) -> dict:
        """What a chunk keeps: sums, count and (below `dim` rows) the rows; merge() adds them up."""
        return {"n": self.n, "sum": self.sum, "outer": self.outer, "rows": torch.cat(self.kept) if self.kept else None}

    def merge(self, state: dict) -> None:
        """Add a state() of other rows; merged in a fixed order, the sums come out the same bits."""
        self.n += state["n"]
        self.sum += state["sum"]
        self.outer += state["outer"]
        rows = state["rows"]
        self.kept = keep_rows(self.kept, torch.as_tensor(rows), self.n, len(self.sum)) if rows is not None else []

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        return mean_cov(self.sum, self.outer, self.n)

    def rows(self):
        return torch.cat(self.kept).numpy() if self.kept else None


def keep_rows(kept: list, f: torch.Tensor, n: int, dim: int) -> list:
    return kept + [f] if n < dim else []


def mean_cov(total, outer, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, unbiased covariance) in float64 from a feature sum, a sum of outer products and a count."""
    if n < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {n}")
    total = torch.as_tensor(total, dtype=torch.float64).cpu().numpy()
    outer = torch.as_tensor(outer, dtype=torch.float64).cpu().numpy()
    mu = total / n
    sigma = (outer - n * np.outer(mu, mu)) / (n - 1)
    return mu, sigma
