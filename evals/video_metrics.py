"""Frame-prediction measures for video models on labelled clips (the moving digits), with no
pretrained weights: what a person would check by eye, as numbers.

The eval service conditions the model on the given frames of HELD-OUT clips (eval.classifier_data:
labelled shards the model never trained on) and compares its predicted frames with those clips'
true continuation:

    frame_mse            mean squared error in [-1, 1] pixel space, per predicted frame and averaged
                         over them (0 = the true continuation)
    baselines            the same error, on the same held-out clips, of two predictions that need no
                         model: `repeat_last` (the last given frame, repeated) and `data_mean` (the
                         mean frame of the training clips, data.shards: per pixel and channel, over
                         every frame)
    frame_accuracy       the fraction of predicted frames in which a digits classifier finds the
                         clip's digit; `real` = the same classifier on the true continuation frames
                         (the ceiling)

The classifier is evals.classifier's recipe (an RBF SVM, C=10, on pixels) on grey frames reduced to
the digit: the ink's bounding box, padded square, resized to CROP x CROP and scaled to a maximum of
1, so that the digit's position and tint do not matter. It is fitted on frames of the TRAINING
clips (data.shards, labelled by their clip's class), so it never saw the held-out digits it scores.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

CROP = 12  # side of the normalised digit crop the classifier sees
INK = 0.35  # a pixel is ink when its grey level is above this fraction of the frame's brightest
MEAN_CLIPS = 1000  # training clips averaged into the data-mean frame
HELDOUT_CLIPS = 2000  # held-out clips read, of which a seeded draw of eval.num_samples is scored
CLASSIFIER_FRAMES = 4000  # training frames the classifier is fitted on
_CACHE: dict = {}


def digit_crops(frames: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) frames in [-1, 1] -> (N, CROP*CROP) grey digit crops in [0, 1]: the bounding box
    of the ink, padded to a square, resized; a frame with no ink gives zeros."""
    grey = (frames.float().clamp(-1, 1).mean(1) + 1) / 2  # (N, H, W) in [0, 1]
    out = np.zeros((len(grey), CROP * CROP), np.float32)
    for i, g in enumerate(grey):
        peak = float(g.max())
        if peak < 0.05:
            continue
        ys, xs = torch.nonzero(g > INK * peak, as_tuple=True)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        side = max(y1 - y0, x1 - x0)
        box = torch.zeros(side, side)
        oy, ox = (side - (y1 - y0)) // 2, (side - (x1 - x0)) // 2
        box[oy:oy + y1 - y0, ox:ox + x1 - x0] = g[y0:y1, x0:x1]
        crop = F.interpolate(box[None, None], size=(CROP, CROP), mode="bilinear", align_corners=False,
                             antialias=side > CROP)[0, 0]
        out[i] = (crop / crop.max().clamp_min(1e-6)).numpy().ravel()
    return out


def read_clips(url: str, model_cfg, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `limit` labelled clips at url: (clips (n, C, T, H, W) in [-1, 1], labels (n,))."""
    from .classifier import read_samples

    clips, labels = read_samples(url, model_cfg, limit, labelled_only=True)
    if not len(clips):
        raise ValueError(f"{url!r} holds no readable labelled clips: video frame measures need moving-digits "
                         f"shards with class labels (cls)")
    return clips, labels


class FrameClassifier:
    """SVC(C=10) on digit crops of training frames; predict() takes frames (N, C, H, W) in [-1, 1]."""

    def __init__(self, clips: torch.Tensor, labels: torch.Tensor):
        from sklearn.svm import SVC

        c, t = clips.shape[1], clips.shape[2]
        frames = clips.permute(0, 2, 1, 3, 4).reshape(-1, c, *clips.shape[3:])[:CLASSIFIER_FRAMES]
        y = labels.repeat_interleave(t)[:CLASSIFIER_FRAMES].numpy()
        self.n = len(y)
        self.model = SVC(C=10).fit(digit_crops(frames), y)

    def predict(self, frames: torch.Tensor) -> np.ndarray:
        return self.model.predict(digit_crops(frames))


class VideoReference(NamedTuple):
    """What the frame measures need once per service: the held-out clips, the training data's mean
    frame and the frame classifier."""
    clips: torch.Tensor  # (n, C, T, H, W) held-out clips in [-1, 1]
    labels: torch.Tensor  # (n,) their digit classes
    mean_frame: torch.Tensor  # (C, H, W) mean of the training clips' frames
    classifier: FrameClassifier
    heldout_url: str
    train_clips: int

    def cond(self, cond_frames: int) -> torch.Tensor:
        return self.clips[:, :, :cond_frames]


def video_reference(train_url: str, heldout_url: str, model_cfg, n: int) -> VideoReference:
    """n held-out clips (a seeded draw: shards keep their source's order, and the embedded digits
    cycle 0..9, so the first ones are a few classes; cycled when fewer), the mean frame and the
    classifier of the training clips; cached per process (the service scores many snapshots)."""
    key = (train_url, heldout_url, model_cfg.frames, model_cfg.image_size, model_cfg.channels, n)
    if key not in _CACHE:
        held, held_y = read_clips(heldout_url, model_cfg, HELDOUT_CLIPS)
        idx = heldout_order(len(held), n)
        train, train_y = read_clips(train_url, model_cfg, MEAN_CLIPS)
        mean = train.mean(dim=(0, 2))
        _CACHE[key] = VideoReference(held[idx], held_y[idx], mean, FrameClassifier(train, train_y), heldout_url,
                                     len(train))
    return _CACHE[key]


def heldout_order(available: int, n: int) -> torch.Tensor:
    """Which of `available` held-out clips the n samples are conditioned on, in order."""
    perm = torch.randperm(available, generator=torch.Generator().manual_seed(0))
    return perm[torch.arange(n) % available]


def frame_errors(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) each -> (B, T): mean squared error of each frame, in [-1, 1] pixel space."""
    return (pred.float() - true.float()).pow(2).mean(dim=(1, 3, 4))


class VideoScore:
    """Accumulates the frame measures over sampling batches of held-out clips."""

    def __init__(self, ref: VideoReference, cond_frames: int):
        self.ref, self.k = ref, cond_frames
        self.err = {"model": [], "repeat_last": [], "data_mean": []}
        self.hits, self.real_hits, self.frames = 0, 0, 0

    def update(self, pred: torch.Tensor, start: int) -> None:
        """pred: (B, C, T_pred, H, W) in [-1, 1], the predictions for held-out clips start..start+B."""
        pred = pred.detach().float().cpu().clamp(-1, 1)
        clips = self.ref.clips[start:start + len(pred)]
        true = clips[:, :, self.k:]
        repeat = clips[:, :, self.k - 1:self.k].expand_as(true)
        mean = self.ref.mean_frame[None, :, None].expand_as(true)
        for name, guess in (("model", pred), ("repeat_last", repeat), ("data_mean", mean)):
            self.err[name].append(frame_errors(guess, true))
        labels = self.ref.labels[start:start + len(pred)].repeat_interleave(true.shape[2]).numpy()
        flat = lambda v: v.permute(0, 2, 1, 3, 4).reshape(-1, v.shape[1], *v.shape[3:])  # noqa: E731
        self.hits += int((self.ref.classifier.predict(flat(pred)) == labels).sum())
        self.real_hits += int((self.ref.classifier.predict(flat(true)) == labels).sum())
        self.frames += len(labels)

    def state(self) -> dict:
        return {"err": {k: torch.cat(v) for k, v in self.err.items()}, "hits": self.hits,
                "real_hits": self.real_hits, "frames": self.frames}

    def merge(self, state: dict) -> None:
        for k, v in state["err"].items():
            self.err[k].append(v)
        self.hits += state["hits"]
        self.real_hits += state["real_hits"]
        self.frames += state["frames"]

    def result(self) -> dict:
        per = {name: torch.cat(e).mean(0) for name, e in self.err.items()}  # (T_pred,) each
        out = {}
        for name, v in per.items():
            key = "frame_mse" if name == "model" else f"frame_mse_{name}"
            out[key], out[f"{key}_per_frame"] = float(v.mean()), [round(float(f), 6) for f in v]
        out["frame_accuracy"] = self.hits / self.frames
        out["frame_accuracy_real"] = self.real_hits / self.frames
        out["clips"] = sum(len(e) for e in self.err["model"])
        return out
