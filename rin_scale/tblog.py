"""TensorBoard for the trainer (RUN/tb) and the eval service (RUN/eval/tb): events are written to a
local folder and, when the run is a bucket, copied whole to RUN/SUBDIR on every flush (torch's
writer pointed at gs:// loses data: TESTING.md)."""
from __future__ import annotations

import os
import shutil
import tempfile

import torch

from . import storage


class TBLog:
    def __init__(self, run: str, subdir: str = "tb"):
        from torch.utils.tensorboard import SummaryWriter

        self.remote = None if storage.is_local(run) else storage.join(run, subdir)
        self.local = (os.path.join(storage.local_path(run), subdir) if self.remote is None
                      else tempfile.mkdtemp(prefix="rin_tb_"))
        self.writer = SummaryWriter(self.local, flush_secs=30)

    def scalars(self, values: dict, step: int) -> None:
        for tag, v in values.items():
            if v is not None:
                self.writer.add_scalar(tag, float(v), step)

    def image(self, tag: str, img: torch.Tensor, step: int) -> None:
        """img (3, H, W) in [0, 1]."""
        self.writer.add_image(tag, img.clamp(0, 1), step)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        self.writer.add_hparams(flat, metrics, run_name=".")

    def flush(self) -> None:
        self.writer.flush()
        if self.remote is not None:
            storage.put_dir(self.local, self.remote)

    def close(self) -> None:
        self.flush()
        self.writer.close()
        if self.remote is not None:  # a temporary copy of what is now in the bucket
            shutil.rmtree(self.local, ignore_errors=True)


def sample_grid(x: torch.Tensor, nrow: int = 0) -> torch.Tensor:
    """A (3, H, W) image in [0, 1] from samples in [-1, 1]: images (B,C,H,W) as a grid; video
    (B,C,T,H,W) as one strip per sample, its frames left to right."""
    from torchvision.utils import make_grid

    x = (x.detach().float().cpu() + 1) / 2
    if x.dim() == 5:
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        return make_grid(frames, nrow=t, padding=1, pad_value=1.0)
    nrow = nrow or max(int(round(x.shape[0] ** 0.5)), 1)
    return make_grid(x, nrow=nrow, padding=1, pad_value=1.0)
