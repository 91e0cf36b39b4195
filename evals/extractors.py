"""Feature extractors for FID (InceptionV3) and FVD (I3D), loaded from local files.

InceptionV3 is torch-fidelity's port of TF's inception-2015-12-05 (the network every published FID
uses); its weights file is torch-fidelity's release asset, a plain state dict:
    https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth
I3D is the TorchScript port StyleGAN-V uses for FVD (Kinetics-400, logits as features):
    https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1

Where no file is given, "random" builds the same architectures from a fixed seed: the numbers then
move with sample quality but do not compare with published ones, and the extractor id says so.

torch-fidelity's InceptionV3 is used directly, not through torchmetrics' FrechetInceptionDistance
(which wraps the same network): evals.frechet computes the distance itself, from kept feature rows
when they are fewer than the dimensions and from cached reference statistics, which that metric
object cannot give without reading its internal sums.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

from rin_scale.media import to_uint8

from .frechet import FeatureStats

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"
INCEPTION_CACHE = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(INCEPTION_URL))
I3D_CACHE = os.path.join(torch.hub.get_dir(), "checkpoints", "i3d_torchscript.pt")


class ExtractorError(RuntimeError):
    """A feature extractor that cannot be loaded; the message names the fix."""


def file_digest(path: str, n: int = 12) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def _resolve(path: str, cache: str, what: str, key: str, url: str) -> str:
    """The weights file to use: the given path, else the standard cache location, else "random"."""
    if path == "random":
        return path
    if path:
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise ExtractorError(f"{key}={path!r}: no such file; download {url} there (see evals/README.md)")
        return path
    if os.path.isfile(cache):
        return cache
    print(f"[evals] WARNING: no {what} weights ({key} is empty and {cache} is missing): using a randomly "
          f"initialised {what}; scores track quality but are NOT comparable with published ones. "
          f"Download {url} and set {key}=PATH.", file=sys.stderr, flush=True)
    return "random"


# --------------------------------------------------------------------------------------------
# InceptionV3 (FID)


class InceptionFeatures(nn.Module):
    """Images (B,C,H,W) in [-1, 1] -> 2048-d pool features (B,2048), float32.

    Images are rounded to uint8 as image files are; torch-fidelity then resizes to 299x299 with
    TF1's bilinear kernel (no antialiasing), which is what makes the numbers match published FIDs.
    """

    num_features = 2048

    def __init__(self, weights: str = ""):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = _resolve(weights, INCEPTION_CACHE, "InceptionV3", "eval.inception_weights", INCEPTION_URL)
        if path == "random":
            path = _random_inception_file()
            self.extractor_id = "inception-v3-random-seed0"
        else:
            self.extractor_id = f"inception-v3-2015-12-05-{file_digest(path)}"
        try:
            # torch-fidelity unpickles with weights_only=False; refuse anything but plain tensors first.
            torch.load(path, map_location="cpu", weights_only=True)
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)
        except Exception as e:
            raise ExtractorError(f"eval.inception_weights: {path} is not torch-fidelity's InceptionV3 state dict "
                                 f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); get it from {INCEPTION_URL}") from None

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u8 = to_uint8(x)
        return self.net(u8.expand(-1, 3, *u8.shape[2:]) if u8.shape[1] == 1 else u8)[0]


def save_random_inception(path: str, seed: int = 0) -> str:
    """The real InceptionV3 architecture with seeded random weights, saved as a state dict file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _KeepInit(FeatureExtractorInceptionV3):
        def load_state_dict(self, *a, **k):  # keep the fresh initialisation
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = os.path.join(tmp, "empty.pth")
        torch.save({}, empty)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = _KeepInit("init", ["2048"], feature_extractor_weights_path=empty)
            for m in net.modules():
                if isinstance(m, nn.Conv2d):  # keep activations O(1) through 94 layers
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


def user_cache_file(name: str, make) -> str:
    """~/.cache/rin_scale/NAME, made by make(path) once and renamed into place. The folder is the
    user's alone (0700): torch-fidelity unpickles the Inception file with weights_only=False and a
    TorchScript file is code, so nobody else may swap them (anyone can, at a fixed path in /tmp)."""
    folder = os.path.expanduser(os.path.join("~", ".cache", "rin_scale"))
    os.makedirs(folder, mode=0o700, exist_ok=True)
    if os.stat(folder).st_uid != os.getuid():
        raise ExtractorError(f"{folder} belongs to another user: it cannot hold generated weights")
    os.chmod(folder, 0o700)
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        os.close(fd)
        try:
            make(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path


def _random_inception_file() -> str:
    return user_cache_file("inception-random-seed0.pth", lambda p: save_random_inception(p, seed=0))


# --------------------------------------------------------------------------------------------
# I3D (FVD)


class I3DFeatures(nn.Module):
    """Videos (B,C,T,H,W) in [-1, 1] -> I3D logits (B,400), as StyleGAN-V computes FVD.

    Frames are resized to 224x224 here (bilinear, no antialiasing) and the TorchScript model is
    called with rescale=False, resize=False, return_features=True.
    """

    num_features = 400

    def __init__(self, weights: str = "", device="cpu"):
        super().__init__()
        path = _resolve(weights, I3D_CACHE, "I3D", "eval.i3d_weights", I3D_URL)
        if path == "random":
            path = user_cache_file("i3d-standin-seed0.pt", lambda p: save_standin_i3d(p, seed=0))
            self.extractor_id = "i3d-standin-seed0"
        else:
            self.extractor_id = f"i3d-torchscript-{file_digest(path)}"
        try:
            self.net = torch.jit.load(path, map_location=device).eval()
        except Exception as e:
            raise ExtractorError(f"eval.i3d_weights: {path} is not a TorchScript I3D ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200]}); get StyleGAN-V's from {I3D_URL}") from None

    @torch.no_grad()
    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = videos.shape
        x = videos.float().clamp(-1, 1)
        if c == 1:
            x = x.expand(-1, 3, -1, -1, -1)
        if (h, w) != (224, 224):
            frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, 3, h, w)
            frames = F.interpolate(frames, size=(224, 224), mode="bilinear", align_corners=False, antialias=False)
            x = frames.reshape(b, t, 3, 224, 224).permute(0, 2, 1, 3, 4)
        feats = self.net(x.contiguous(), rescale=False, resize=False, return_features=True)
        return feats.float().reshape(b, -1)


class StandinI3D(nn.Module):
    """A small 3-D conv net with StyleGAN-V's I3D interface; a stand-in where the real file is missing."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 16, kernel_size=(3, 7, 7), stride=(1, 4, 4), padding=(1, 3, 3))
        self.conv2 = nn.Conv3d(16, 64, kernel_size=3, stride=(2, 4, 4), padding=1)
        self.fc = nn.Linear(64, 400)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if rescale:
            x = x / 127.5 - 1
        if resize:
            t = x.shape[2]
            x = F.interpolate(x, size=(t, 224, 224), mode="trilinear", align_corners=False)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = self.fc(x.mean(dim=(2, 3, 4)))
        return x if return_features else x.softmax(-1)


def save_standin_i3d(path: str, seed: int = 0) -> str:
    """Script the stand-in and save it: it then loads through torch.jit.load like the real file."""
    import warnings

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = StandinI3D().eval()
    with warnings.catch_warnings():  # torch.jit is deprecated, but the real I3D file is TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(net).save(path)
    return path


# --------------------------------------------------------------------------------------------
# Accumulating statistics of a set of images or videos


class SampleStats(FeatureStats):
    """Float64 statistics of the extractor's features of a set of samples in [-1, 1]."""

    def __init__(self, extractor: "Extractor"):
        super().__init__(extractor.net.num_features)
        self.extractor = extractor

    def update(self, x: torch.Tensor) -> None:
        super().update(self.extractor.net(x.to(self.extractor.device)))


class Extractor:
    """The metric's feature network; `new_stats()` starts an accumulator for one set of samples."""

    def __init__(self, metric: str, eval_cfg, device="cpu"):
        if metric not in ("fid", "fvd"):
            raise ExtractorError(f"eval.metric={metric!r}: use fid (images) or fvd (video)")
        self.metric, self.device = metric, torch.device(device)
        if metric == "fid":
            self.net = InceptionFeatures(eval_cfg.inception_weights).to(self.device)
        else:
            import warnings

            with warnings.catch_warnings():  # torch.jit is deprecated, but it is what the I3D file is
                warnings.simplefilter("ignore", FutureWarning)
                self.net = I3DFeatures(eval_cfg.i3d_weights, device=self.device)
        self.id = self.net.extractor_id

    def new_stats(self) -> SampleStats:
        return SampleStats(self)


def metric_for(cfg) -> str:
    """eval.metric with "auto" resolved: fid for images, fvd for video."""
    m = cfg.eval.metric
    return m if m != "auto" else ("fvd" if cfg.model.is_video else "fid")
