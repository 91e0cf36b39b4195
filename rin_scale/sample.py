"""Sample from an EMA snapshot without DeepSpeed: `python -m rin_scale.sample RUN_OR_SNAPSHOT --out grid.png`.

RUN_OR_SNAPSHOT is a snapshot folder (`RUN/snapshots/step-000001600`) or a run directory (its newest
complete snapshot), at any fsspec URL. Writes a PNG grid (class-conditional models: one column per
class, cycling the labels) and, with `--npz`, the samples as uint8 NHWC in `arr_0` (video: NTHWC,
the given frames then the predicted ones) with labels in `arr_1`: the layout of ADM's evaluation
suite, for published-comparable FID with the reference batches of ADM/DiT. Video snapshots take
their conditioning frames from real clips: `--data` shards (default: the run's `data.shards`).
"""
from __future__ import annotations

import argparse
import io
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from . import rundir, storage
from .config import ConfigError, guidance_problem
from .data import DataError, leading_frames
from .engine import choose_precision
from .media import to_uint8


def resolve_snapshot(url: str) -> tuple[str, str]:
    """(snapshot URL, run URL): a snapshot folder is used as is, a run directory gives its newest."""
    url = url.rstrip("/")
    fs, path = storage.fs_path(url)
    if fs.exists(storage.join(path, "ema.safetensors")):
        return url, url.rsplit("/snapshots/", 1)[0] if "/snapshots/" in url else ""
    newest = rundir.newest_complete(url, "snapshots")
    if newest is None:
        raise ConfigError(f"{url} is neither a snapshot (no ema.safetensors) nor a run with a complete snapshot")
    return newest[1], url


def chunk_plan(n: int, size: int) -> list[tuple[int, int]]:
    """[(start, stop)] of the chunks of n samples, `size` each (the last one shorter)."""
    size = max(int(size), 1)
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def sample_generators(seed: int, start: int, stop: int, device="cpu") -> list:
    """One generator per sample index: sample i's noise depends on (seed, i) alone, so any split of
    the samples into chunks, jobs or batches draws the same noise."""
    out = []
    for i in range(start, stop):
        a, b = np.random.SeedSequence([seed, i]).generate_state(2)  # well mixed, unlike seed + i
        out.append(torch.Generator(device).manual_seed(int(a) << 31 | int(b) >> 1))
    return out


def sample_range(model, dcfg, start: int, stop: int, batch: int, seed: int, labels=None, cond=None, steps=None,
                 sampler=None, guidance=None, frames=0):
    """Yields (first index, samples in [-1, 1] on the model's device) for samples start..stop, `batch`
    at a time. labels and cond are indexed by sample index (all N of them). Video with given frames:
    the predicted frames of clips `frames` long (0 = the model's window)."""
    from .diffusion import sample, sample_clip

    m = model.cfg
    device = next(model.parameters()).device
    for a in range(start, stop, batch):
        b = min(batch, stop - a)
        gen = sample_generators(seed, a, a + b, device)
        lb = labels[a:a + b].to(device) if labels is not None else None
        with torch.no_grad():
            if cond is not None:
                cb = cond[a:a + b].to(device)
                x = sample_clip(model, cb, max(frames, m.frames), dcfg, labels=lb, steps=steps,
                                sampler=sampler, generator=gen, guidance=guidance)
            else:
                x = sample(model, (b, *m.sample_shape), dcfg, labels=lb, steps=steps,
                           sampler=sampler, generator=gen, guidance=guidance)
        yield a, x


def sample_labels(n: int, num_classes: int, label=None):
    """Sample i's class: i mod K (every class equally often), or `label` for all; None: unconditional."""
    if not num_classes:
        return None
    return torch.full((n,), label) if label is not None else torch.arange(n) % num_classes


def generate(model, dcfg, n: int, batch: int, seed: int, steps=None, sampler=None, guidance=None,
             label=None, cond=None, device="cpu", progress=True, frames=0, start=0):
    """(samples start..start+n in [-1, 1] on the CPU, their labels or None); same seed, same samples.
    Video with given frames: whole clips `frames` long (0 = the model's window), given frames first."""
    labels = sample_labels(start + n, model.cfg.num_classes, label)
    out = []
    with tqdm(total=n, unit="sample", disable=not progress, file=sys.stderr) as bar:
        for a, x in sample_range(model, dcfg, start, start + n, batch, seed, labels, cond, steps, sampler,
                                 guidance, frames):
            x = x.float().clamp(-1, 1).cpu()
            if cond is not None:
                x = torch.cat([cond[a:a + len(x)].float(), x], dim=2)
            out.append(x)
            bar.update(len(x))
    return torch.cat(out), (labels[start:] if labels is not None else None)


class NpzWriter:
    """ADM's sample file (what its evaluator and DiT's read: `arr_0` uint8 NHWC, or NTHWC for video,
    labels in `arr_1`), written a chunk at a time: the .npy header of the final shape goes first, then
    each chunk's bytes stream into the zip member, so memory holds one chunk (and the labels)."""

    def __init__(self, url: str, shape: tuple, labelled: bool):
        import tempfile
        import zipfile

        self.url, self.shape, self.rows = url, tuple(shape), 0
        self.local = storage.local_path(url) if storage.is_local(url) else tempfile.mkstemp(suffix=".npz")[1]
        self.labels = [] if labelled else None
        self.zip = zipfile.ZipFile(self.local, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.member = self.zip.open("arr_0.npy", "w", force_zip64=True)
        np.lib.format.write_array_header_1_0(self.member, {"descr": "|u1", "fortran_order": False,
                                                           "shape": self.shape})

    def add(self, x: torch.Tensor, labels=None) -> None:
        """x: samples in [-1, 1], channels first (N, C, H, W) or (N, C, T, H, W)."""
        self.add_uint8(to_uint8(x).movedim(1, -1).contiguous().numpy(), labels)  # channels last, as ADM's

    def add_uint8(self, u8: np.ndarray, labels=None) -> None:
        """u8: samples already as the file holds them (uint8, channels last)."""
        u8 = np.ascontiguousarray(u8, dtype=np.uint8)
        if u8.shape[1:] != self.shape[1:] or self.rows + len(u8) > self.shape[0]:
            raise ValueError(f"samples of shape {u8.shape[1:]} do not fit {self.shape}")
        self.member.write(u8.tobytes())
        self.rows += len(u8)
        if self.labels is not None:
            self.labels.append(np.asarray(labels, dtype=np.int64))

    def close(self) -> None:
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.url}: {self.rows} samples written of {self.shape[0]}")
        self.member.close()
        if self.labels is not None:
            with self.zip.open("arr_1.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.concatenate(self.labels), allow_pickle=False)
        self.zip.close()
        if not storage.is_local(self.url):
            fs, path = storage.fs_path(self.url)
            fs.put_file(self.local, path)
            os.remove(self.local)


def class_index(text: str, num_classes: int, run: str, data: str = "") -> int:
    """--class as an index, or as a class name from the manifest of the run's data.shards (or --data)."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        label = int(text)
        if not 0 <= label < num_classes:
            raise ConfigError(f"--class {label}: the model has {num_classes} classes (0..{num_classes - 1})")
        return label
    if num_classes <= 0:
        raise ConfigError(f"--class {text}: the model is unconditional (model.num_classes=0)")
    from .shards import manifest_of

    if not data:
        if not run:
            raise ConfigError(f"--class {text}: a class name needs the run's manifest; give the run directory "
                              f"(or --data SHARDS), or the class index")
        data = rundir.load_run_config(run).data.shards
    classes = manifest_of(data).get("classes") or []
    if text in classes:
        return classes.index(text)
    if not classes:
        raise ConfigError(f"--class {text}: the shards {data} list no class names: give the class index "
                          f"(0..{num_classes - 1})")
    shown = ", ".join(classes[:20]) + (f", ... ({len(classes)} in all)" if len(classes) > 20 else "")
    raise ConfigError(f"--class {text}: not a class of {data}: use one of {shown} (or an index 0..{num_classes - 1})")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def _at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{v} must be at least {lo}")
        return v
    return parse


def prepare_output(url: str, flag: str) -> None:
    """Fail before sampling, not after: a local file's folder is created; it must not be a folder."""
    if not url or not storage.is_local(url):
        return  # an object store has no folders to create; a write error there is one line too
    path = os.path.abspath(storage.local_path(url))
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {url} is a folder: give a file name, e.g. {flag} {os.path.join(url, 'samples.png')}")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{flag} {url}: cannot create its folder ({e.strerror or e})") from None
    if not os.access(os.path.dirname(path), os.W_OK):
        raise ConfigError(f"{flag} {url}: its folder {os.path.dirname(path)} is not writable")


def main(argv=None) -> int:
    p = _Parser(prog="python -m rin_scale.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="snapshot folder or run directory (any fsspec URL)")
    p.add_argument("--out", default="samples.png", help="PNG grid to write")
    p.add_argument("--n", type=_at_least(0), default=0, help="samples (default: 10 per class, or 64)")
    p.add_argument("--class", dest="label", default=None,
                   help="condition every sample on this class: an index, or a name from the run's manifest")
    p.add_argument("--steps", type=_at_least(1), default=None, help="sampling steps (default: the snapshot's config)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None)
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance weight w")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=_at_least(1), default=64)
    p.add_argument("--zoom", type=_at_least(1), default=1, help="enlarge the grid this many times (nearest pixels)")
    p.add_argument("--npz", default="", help="also write the samples as an ADM-style .npz (streamed a chunk at a time)")
    p.add_argument("--chunk", type=_at_least(1), default=1000,
                   help="samples per chunk: what memory holds while writing --npz (the eval service's eval.chunk)")
    p.add_argument("--grid", type=_at_least(0), default=100,
                   help="with --npz: samples shown in the PNG grid (0 = all)")
    p.add_argument("--data", default="", help="video: shards whose clips give the conditioning frames")
    p.add_argument("--frames", type=_at_least(0), default=0,
                   help="video: frames per clip, given + predicted (default: the run's eval.frames, else the "
                        "model's window); longer clips are extended autoregressively")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 on GPUs and on CPUs whose bf16 matmul is clearly faster (the trainer's rule)")
    a = p.parse_args(argv)
    if a.guidance is not None and not a.guidance >= 0:
        p.error(f"argument --guidance: {a.guidance} must be 0 or more")
    try:
        snap, run = resolve_snapshot(a.source)
        model, dcfg, meta = rundir.load_snapshot_model(snap, device=a.device)
        m = model.cfg
        if a.label is not None:
            a.label = class_index(a.label, m.num_classes, run, a.data)
        problem = a.guidance and guidance_problem(m)
        if problem:  # now, not after loading data and printing the plan
            raise ConfigError(f"--guidance {a.guidance}: {problem}; sample without --guidance")
        n = a.n or (10 * m.num_classes if 0 < m.num_classes <= 10 else 64)
        cond, frames = None, a.frames
        if m.is_video and m.cond_frames:
            data = a.data
            if run and not (data and frames):
                run_cfg = rundir.load_run_config(run)
                data, frames = data or run_cfg.data.shards, frames or run_cfg.eval.frames
            if not data:
                raise ConfigError("a video snapshot needs conditioning frames: pass --data SHARDS")
            cond = leading_frames(data, m, n)
        dev = torch.device(a.device)
        prec = choose_precision(a.precision, dev)
        prepare_output(a.out, "--out")  # now, not after minutes of sampling
        prepare_output(a.npz, "--npz")
    except (ConfigError, DataError, rundir.SnapshotError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shown = min(n, a.grid) if a.npz and a.grid else n  # the grid: a fixed number, not all of an export
    print(f"[sample] {snap} (step {meta.get('step')}): {n} samples on {a.device} in {prec.name} ({prec.reason})",
          file=sys.stderr)
    try:
        write_outputs(a, model, dcfg, n, shown, cond, frames, prec.autocast(dev))
    except (OSError, storage.StorageUnavailable) as e:
        print(f"error: writing the samples failed: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 1
    return 0


def write_outputs(a, model, dcfg, n: int, shown: int, cond, frames: int, autocast) -> None:
    """Samples a chunk at a time (the eval service's chunks: the same noise per sample index),
    streamed into the .npz; the first `shown` go to the PNG grid."""
    from torchvision.utils import save_image

    from .tblog import sample_grid

    m = model.cfg
    npz, grid = None, []
    with tqdm(total=n, unit="sample", file=sys.stderr) as bar:
        for start, stop in chunk_plan(n, a.chunk if a.npz else n):
            with autocast:
                x, labels = generate(model, dcfg, stop - start, a.batch, a.seed, a.steps, a.sampler, a.guidance,
                                     a.label, cond, a.device, progress=False, frames=frames, start=start)
            if a.npz:
                if npz is None:
                    npz = NpzWriter(a.npz, (n, *x.movedim(1, -1).shape[1:]), labels is not None)
                npz.add(x, labels)
            if start < shown:
                grid.append(x[: shown - start])
            bar.update(stop - start)
    nrow = m.num_classes if 0 < m.num_classes <= 10 and a.label is None else 0
    buf = io.BytesIO()
    img = sample_grid(torch.cat(grid), nrow=nrow)
    if a.zoom > 1:
        img = img.repeat_interleave(a.zoom, 1).repeat_interleave(a.zoom, 2)
    save_image(img, buf, format="png")
    storage.write_bytes(a.out, buf.getvalue())
    print(f"[sample] grid of {shown} -> {a.out}", file=sys.stderr)
    if npz is not None:
        npz.close()
        print(f"[sample] {npz.shape} uint8 -> {a.npz}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
