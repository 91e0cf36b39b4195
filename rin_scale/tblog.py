"""TensorBoard for the trainer (RUN/tb) and the eval service (RUN/eval/tb): events are written to a
local folder (torch's writer pointed at gs:// loses data: TESTING.md). When the run is a bucket, each
flush closes the current event file, uploads it once as a new object of RUN/SUBDIR and deletes it;
the next event goes to a new file. A flush then costs the same at step 100 as at step 100,000, and
TensorBoard reads the folder's files in name order (named by upload time) as one run."""
from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
import time

import torch

from . import storage


class TBLog:
    def __init__(self, run: str, subdir: str = "tb"):
        from torch.utils.tensorboard import SummaryWriter

        self.remote = None if storage.is_local(run) else storage.join(run, subdir)
        self.local = os.path.join(storage.local_path(run), subdir) if self.remote is None else _scratch()
        self.writer = SummaryWriter(self.local, flush_secs=30)

    def scalars(self, values: dict, step: int) -> None:
        for tag, v in values.items():
            if v is not None:
                self.writer.add_scalar(tag, float(v), step)

    def image(self, tag: str, img: torch.Tensor, step: int) -> None:
        """img (3, H, W) in [0, 1]."""
        self.writer.add_image(tag, img.clamp(0, 1), step)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        from .config import mask_secrets  # train.run_dir and data.shards may carry a credential

        flat = {k: (v if isinstance(v, (int, float, bool)) else mask_secrets(str(v))) for k, v in hparams.items()}
        self.writer.add_hparams(flat, metrics, run_name=".")

    def flush(self) -> None:
        if self.remote is None:
            self.writer.flush()
            return
        self.writer.close()  # finishes the event file; the writer opens a new one at its next event
        for i, name in enumerate(sorted(os.listdir(self.local))):
            src = os.path.join(self.local, name)
            dst = storage.join(self.remote, f"events.out.tfevents.{time.time_ns():020d}.{i:03d}.{socket.gethostname()}")
            storage.put_file(src, dst)
            os.remove(src)  # in the bucket now

    def close(self) -> None:
        self.flush()
        self.writer.close()
        if self.remote is not None:
            shutil.rmtree(self.local, ignore_errors=True)


SCRATCH_PREFIX = "rin_tb_"


def _scratch() -> str:
    """A local folder for a bucket run's event files before upload, named by host and pid:
    removed at exit, and by the next start on this machine when the process died without exiting
    (a kill, an OOM)."""
    tmp, mine = tempfile.gettempdir(), f"{SCRATCH_PREFIX}{socket.gethostname()}_"
    for name in os.listdir(tmp):  # this host's only: a container sharing /tmp has pids of its own
        pid = name[len(mine):].split("_", 1)[0]
        if name.startswith(mine) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
    folder = tempfile.mkdtemp(prefix=f"{mine}{os.getpid()}_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


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
