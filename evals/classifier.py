"""Class accuracy of samples: a scikit-learn classifier fitted on held-out real images.

For a class-conditional model, the fraction of samples that the classifier assigns to the class
they were conditioned on says whether conditioning works, independently of FID. The classifier's
own accuracy on real held-out data (5-fold cross-validation) is reported beside it as the ceiling.
"""
from __future__ import annotations

import numpy as np
import torch

_CACHE: dict = {}


def read_samples(url: str, model_cfg, limit: int = 0, labelled_only: bool = False):
    """(x (N, ...) in [-1, 1], labels (N,)) of the first `limit` (0: all) decodable samples at url;
    x is empty when there are none."""
    from rin_scale.data import iter_samples

    xs, ys = [], []
    for x, y, _ in iter_samples(url, model_cfg):
        if labelled_only and int(y) < 0:
            continue
        xs.append(x)
        ys.append(int(y))
        if limit and len(xs) >= limit:
            break
    return (torch.stack(xs) if xs else torch.empty(0)), torch.tensor(ys, dtype=torch.long)


class SampleClassifier:
    """An RBF SVM on raw pixels in [-1, 1]; digits-sized data fits in well under a second."""

    def __init__(self, url: str, model_cfg, limit: int = 0):
        from sklearn.model_selection import cross_val_score
        from sklearn.svm import SVC

        x, y = read_samples(url, model_cfg, limit, labelled_only=True)
        xs, ys = [v.numpy().ravel() for v in x], y.tolist()
        counts = np.bincount(ys, minlength=1) if ys else np.zeros(1, int)
        present = counts[counts > 0]
        if len(present) < 2:
            raise ValueError(f"eval.classifier_data={url!r} has {len(ys)} labelled samples in {len(present)} "
                             f"class(es): point it at held-out shards with class labels (cls)")
        self.x, self.y = np.stack(xs).astype(np.float32), np.array(ys)
        folds = int(min(5, present.min()))
        self.real_accuracy = (float(cross_val_score(SVC(C=10), self.x, self.y, cv=folds).mean())
                              if folds >= 2 else float("nan"))
        self.model = SVC(C=10).fit(self.x, self.y)
        self.n = len(self.y)

    def predict(self, x: torch.Tensor) -> np.ndarray:
        """x: samples (B, ...) in [-1, 1] shaped as the real data -> class indices (B,)."""
        flat = x.detach().float().clamp(-1, 1).cpu().reshape(x.shape[0], -1).numpy()
        if flat.shape[1] != self.x.shape[1]:
            raise ValueError(f"samples have {flat.shape[1]} values each, the classifier's data {self.x.shape[1]}: "
                             f"eval.classifier_data must hold images of the model's size and channels")
        return self.model.predict(flat)

    def accuracy(self, x: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.predict(x) == labels.cpu().numpy()).mean())


def get_classifier(url: str, model_cfg, limit: int = 0) -> SampleClassifier:
    """Fitted once per process and dataset (the service scores many snapshots)."""
    key = (url, model_cfg.image_size, model_cfg.channels, limit)
    if key not in _CACHE:
        _CACHE[key] = SampleClassifier(url, model_cfg, limit)
    return _CACHE[key]


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """0, 1, ..., K-1, 0, 1, ...: every class equally often (to within one)."""
    return torch.arange(n) % num_classes
