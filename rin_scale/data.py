"""The streaming data pipeline: WebDataset tar shards from any fsspec URL, resumable to the sample.

    loader = ShardLoader(cfg.data, cfg.model, batch_size, rank, world_size, state=saved)
    for batch in loader: ...            # forever, by epochs; batch = {"x", "label", "key"}
    saved = loader.state_dict()         # JSON-able; what the consumer has received so far

Order. Each epoch the shards are shuffled with (seed, epoch) and concatenated into one global
sample sequence. Rank r takes the contiguous range [r*q, r*q + n) with q = total // world_size and
n = (q // batch) * batch, so every rank yields exactly q // batch batches per epoch: the remainder
(total - world_size * n samples, at most world_size * batch - 1 plus total % world_size) is
not seen in that epoch; since the shard order changes every epoch, a different part is left out
each time. Within a rank, batch j comes from worker j % K (K DataLoader workers, the order in
which the DataLoader hands batches out); each worker reads a contiguous piece of the rank's range
and shuffles it with a buffer of data.shuffle_buffer samples. The buffer shuffle is computed on
sample indices, before any byte is read, so resuming derives the same permutation and reads only
the samples not yet consumed (skipped tar members are passed over by their headers, undecoded).
Augmentation draws from a generator seeded by (seed, epoch, sample position): a resumed run sees
the same pixels too.

State = {"epoch", "position" (batches handed to the consumer this epoch by this rank),
"world_size", "batch_size", "workers", "seed", "total"}. Resuming with another world size, batch
size, worker count or dataset restarts the current epoch at the same fraction of it: the order is
re-derived for the new layout, so within that epoch some samples may repeat and others be missed.

Errors. An unreadable sample, or the rest of a truncated/corrupt shard, is counted in
stats["errors"] and replaced by the worker's previous good sample (so batch counts stay equal on
every rank); when errors exceed data.max_error_rate of the samples handed out, the loader stops
with a DataError.
"""
from __future__ import annotations

import io
import json
import os
import tarfile

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before gcsfs is imported

import fsspec
import numpy as np
import torch
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
MIN_SAMPLES_FOR_RATE = 200  # error-rate check waits for this many samples (one bad shard up front)


class DataError(RuntimeError):
    """Data that cannot be used; the message names the problem and the fix."""


# --------------------------------------------------------------------------------------------
# fsspec access, safe in forked workers


_FS_CACHE: dict = {}


def url_fs(url: str):
    """(filesystem, path) for a URL, one filesystem per process and protocol.

    Instances are never shared across fork (gcsfs is not fork-safe): a forked DataLoader worker
    sees a new pid and makes its own, skipping fsspec's instance cache.
    """
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    key = (os.getpid(), protocol)
    fs = _FS_CACHE.get(key)
    if fs is None:
        kwargs = {"skip_instance_cache": True}
        if protocol in ("gs", "gcs") and os.environ.get("STORAGE_EMULATOR_HOST") and \
                not os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
            kwargs["token"] = "anon"  # an emulator needs no credentials; probing for them is slow
        fs = fsspec.filesystem(protocol, **kwargs)
        _FS_CACHE[key] = fs
    return fs, fs._strip_protocol(url)


READ_BUFFER = 8 << 20  # bytes per ranged read when streaming a tar from a bucket


def open_read(url: str):
    """A buffered, seekable binary stream for a URL.

    A tar is read as many small header and member reads; in a bucket each read of gcsfs's own cache
    is a round trip through its event loop (2.6 s instead of 0.05 s for a 1.4 MB shard), so
    remote files get one large buffer in front.
    """
    fs, path = url_fs(url)
    f = fs.open(path, "rb")
    return f if is_local(url) else io.BufferedReader(f, READ_BUFFER)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith(("file://", "local://"))


def join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def _dirname(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."


# --------------------------------------------------------------------------------------------
# Manifest and shard listing


def _expand_braces(pattern: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def tar_keys(fileobj) -> list[str]:
    """Sample keys of a tar in order, reading headers only."""
    keys = []
    with tarfile.open(fileobj=fileobj, mode="r:") as tf:
        for m in tf:
            if m.isfile():
                k = split_name(m.name)[0]
                if not keys or keys[-1] != k:
                    keys.append(k)
    return keys


def split_name(name: str) -> tuple[str, str]:
    """webdataset's convention: key = path up to the first dot of the basename, ext = the rest."""
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (d + "/" + stem if d else stem), ext.lower()


def find_manifest(url: str) -> str | None:
    """The manifest for a shard folder URL: manifest.json, or the one *-manifest.json in it."""
    fs, path = url_fs(url)
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        raise DataError(f"data.shards={url!r} does not exist: point it at a shard folder or manifest "
                        f"(make one with: python -m data_tools.shard --embedded digits OUT)") from None
    if "manifest.json" in names:
        return join(url, "manifest.json")
    found = sorted(n for n in names if n.endswith("-manifest.json"))
    if len(found) > 1:
        raise DataError(f"{url} holds several manifests ({', '.join(found)}): set data.shards to one of them")
    return join(url, found[0]) if found else None


def read_manifest(url: str) -> dict:
    fs, path = url_fs(url)
    try:
        with fs.open(path, "rb") as f:
            m = json.load(f)
    except FileNotFoundError:
        raise DataError(f"manifest {url!r} does not exist: check data.shards") from None
    except ValueError as e:
        raise DataError(f"manifest {url!r} is not valid JSON ({e}): re-run data_tools.shard") from None
    if not isinstance(m, dict) or "shards" not in m:
        raise DataError(f"{url!r} is not a shard manifest (no 'shards'): point data.shards at the folder")
    return m


def list_shards(url: str) -> tuple[list[str], list[int], dict]:
    """(shard URLs, sample counts, manifest or {}) for a folder, a manifest URL or a brace pattern.

    Without a manifest, counts come from reading every tar's headers once.
    """
    if not url:
        raise DataError("data.shards is empty: set data.shards=URL of a shard folder "
                        "(make one with: python -m data_tools.shard --embedded digits OUT)")
    wanted = None
    if url.endswith(".json"):
        man_url, base = url, _dirname(url)
    elif "{" in url or url.endswith(".tar"):
        wanted = _expand_braces(url) if "{" in url else [url]
        base = _dirname(wanted[0])
        man_url = find_manifest(base)
    else:
        base = url.rstrip("/")
        man_url = find_manifest(base)
    man = read_manifest(man_url) if man_url else {}
    if man:
        shards = [join(base, s["name"]) for s in man["shards"]]
        counts = [int(s["samples"]) for s in man["shards"]]
        if wanted is not None:
            by = dict(zip(shards, counts))
            missing = [w for w in wanted if w not in by]
            if missing:
                raise DataError(f"{missing[0]} is not in the manifest {man_url}: fix the pattern in data.shards")
            shards, counts = wanted, [by[w] for w in wanted]
    else:
        if wanted is None:
            fs, path = url_fs(base)
            protocol = url.split("://")[0] + "://" if "://" in url else ""
            wanted = sorted(protocol + p if protocol else p for p in fs.glob(path + "/*.tar"))
        if not wanted:
            raise DataError(f"no .tar shards and no manifest at {url}: make shards with data_tools.shard")
        shards, counts = wanted, []
        for s in shards:
            with open_read(s) as f:
                counts.append(len(tar_keys(f)))
    return shards, counts, man


# --------------------------------------------------------------------------------------------
# Decoding and augmentation


RANDOM_CROP_SCALE = 1.25  # random crops: the shorter side is first resized to [1, 1.25] x size (as ADM)


def _resize_crop(img: Image.Image, size: int, crop=None) -> Image.Image:
    """Resize the shorter side to size and crop a centred square along the longer one; or, with
    crop=(fx, fy, fs) in [0, 1), resize the shorter side to size * (1 + (RANDOM_CROP_SCALE - 1) fs)
    and crop at fractions (fx, fy), so square data sharded at the training size is cropped too.
    Data sharded square at the training size and centre-cropped is not resized at all."""
    w, h = img.size
    target = size if crop is None else round(size * (1 + (RANDOM_CROP_SCALE - 1) * crop[2]))
    s = target / min(w, h)
    if s != 1:
        img = img.resize((max(target, round(w * s)), max(target, round(h * s))), Image.BICUBIC)
    w, h = img.size
    if (w, h) == (size, size):
        return img
    if crop is not None:
        x, y = int(crop[0] * (w - size + 1)), int(crop[1] * (h - size + 1))
    else:
        x, y = (w - size) // 2, (h - size) // 2
    return img.crop((x, y, x + size, y + size))


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, C) -> uint8 with channels first: (C, H, W) or (C, T, H, W)."""
    if not (arr.flags.writeable and arr.flags.c_contiguous):
        arr = np.array(arr)  # torch wants writable, contiguous memory
    t = torch.from_numpy(arr)
    return t.permute(2, 0, 1) if t.ndim == 3 else t.permute(3, 0, 1, 2)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [-1, 1] (one op per batch in the workers: cheaper than per sample)."""
    return x.float().div_(127.5).sub_(1.0)


def _augment_draws(rng, random_crop, hflip):
    crop = (rng.random(), rng.random(), rng.random()) if rng is not None and random_crop else None
    flip = bool(rng is not None and hflip and rng.random() < 0.5)
    return crop, flip


def decode_image(data: bytes, size: int, channels: int, rng=None, random_crop=False, hflip=False) -> torch.Tensor:
    img = Image.open(io.BytesIO(data))
    crop, flip = _augment_draws(rng, random_crop, hflip)
    if img.format == "JPEG":  # DCT-domain downscaling: a far cheaper decode of large JPEGs
        img.draft("RGB" if channels == 3 else "L", (size, size))
    mode = "RGB" if channels == 3 else "L"
    img = _resize_crop(img if img.mode == mode else img.convert(mode), size, crop)
    arr = np.array(img)
    arr = arr[..., None] if arr.ndim == 2 else arr
    return _to_tensor(arr[:, ::-1] if flip else arr)


def decode_video(data: bytes, frames: int, size: int, channels: int, rng=None, random_crop=False,
                 hflip=False) -> torch.Tensor:
    """T = frames consecutive frames (random start when longer; the last frame repeats when shorter)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        n = stream.frames  # from the container's index; 0 when unknown: then decode all to count
        start = int(rng.integers(0, n - frames + 1)) if rng is not None and n > frames else 0
        decoded = []
        for i, f in enumerate(container.decode(stream)):
            if i >= start:
                decoded.append(f.to_ndarray(format="rgb24"))
            if n and len(decoded) == frames:
                break  # the frames after the clip are never decoded
    if not decoded:
        raise ValueError("video has no frames")
    if not n and rng is not None and len(decoded) > frames:
        start = int(rng.integers(0, len(decoded) - frames + 1))
        decoded = decoded[start:]
    clip = decoded[:frames]
    clip += [clip[-1]] * (frames - len(clip))
    crop, flip = _augment_draws(rng, random_crop, hflip)  # one crop and one flip for the whole clip
    if clip[0].shape[:2] != (size, size) or crop is not None:
        clip = [np.asarray(_resize_crop(Image.fromarray(f), size, crop)) for f in clip]
    arr = np.stack(clip)
    if channels == 1:
        arr = arr.mean(-1, keepdims=True).astype(np.uint8)
    return _to_tensor(arr[:, :, ::-1] if flip else arr)


def decode_sample(sample: dict, model_cfg, rng=None, random_crop=False, hflip=False):
    """A raw sample {ext: bytes} -> (x uint8 tensor CHW or CTHW, label int). Raises if undecodable."""
    media = None
    if model_cfg.frames > 0:
        media = next((e for e in VIDEO_EXTS if e in sample), None)
        if media is None:
            raise ValueError(f"no video member ({'/'.join(VIDEO_EXTS)}) in sample {sample.get('__key__')}")
        x = decode_video(sample[media], model_cfg.frames, model_cfg.image_size, model_cfg.channels,
                         rng, random_crop, hflip)
    else:
        media = next((e for e in IMAGE_EXTS if e in sample), None)
        if media is None:
            raise ValueError(f"no image member ({'/'.join(IMAGE_EXTS)}) in sample {sample.get('__key__')}")
        x = decode_image(sample[media], model_cfg.image_size, model_cfg.channels, rng, random_crop, hflip)
    label = int(sample["cls"]) if "cls" in sample else -1
    return x, label


# --------------------------------------------------------------------------------------------
# Reading tar members by sample position


def read_tar_samples(url: str, wanted=None, stop=None):
    """Yields (index, sample dict) for the samples of one shard, in order, up to index `stop`.

    wanted(index) -> bool picks the samples whose data is read; the others are passed over by their
    tar headers. A truncated or corrupt tar raises (tarfile.TarError / OSError) where it breaks.
    """
    with open_read(url) as f, tarfile.open(fileobj=f, mode="r:") as tf:
        cur_key, cur, index = None, None, -1
        for m in tf:
            if not m.isfile():
                continue
            key, ext = split_name(m.name)
            if key != cur_key:
                if cur is not None:
                    yield index, cur
                index += 1
                if stop is not None and index >= stop:
                    return  # the rest of the shard belongs to another worker or rank: not read
                cur_key = key
                cur = {"__key__": key} if wanted is None or wanted(index) else None
            if cur is not None:
                data = tf.extractfile(m).read()
                if len(data) != m.size:
                    raise tarfile.ReadError(f"truncated member {m.name}")
                cur[ext] = data
        if cur is not None:
            yield index, cur


def buffer_permutation(n: int, buffer: int, rng) -> np.ndarray:
    """Order in which a streaming shuffle buffer of `buffer` slots emits inputs 0..n-1.

    Output k only needs inputs below k + buffer: the stream can be read in order with bounded memory.
    """
    if buffer <= 1 or n <= 1:
        return np.arange(n)
    out = np.empty(n, np.int64)
    buf = list(range(min(buffer, n)))
    nxt, k = len(buf), 0
    picks = rng.integers(0, 2**62, size=n)
    while buf:
        j = int(picks[k] % len(buf))
        out[k] = buf[j]
        k += 1
        if nxt < n:
            buf[j] = nxt
            nxt += 1
        else:
            buf[j] = buf[-1]
            buf.pop()
    return out


# --------------------------------------------------------------------------------------------
# The per-epoch plan: which samples a rank and a worker read, in which order


def epoch_plan(counts: list[int], seed: int, epoch: int, rank: int, world_size: int, batch: int, workers: int):
    """(shard order, batches per rank, [(first global position, samples, batches)] per worker)."""
    total = sum(counts)
    order = np.random.default_rng([seed, epoch, 7]).permutation(len(counts))
    q = total // world_size
    nb = q // batch
    start = rank * q
    pieces, off = [], start
    for w in range(workers):
        nbw = len(range(w, nb, workers))
        pieces.append((off, nbw * batch, nbw))
        off += nbw * batch
    return order, nb, pieces


def _locate(counts, order, pos_start, length):
    """Global-sequence range -> list of (shard index, first member, last member + 1, offset)."""
    segs, base, end = [], 0, pos_start + length
    for s in order:
        c = counts[s]
        lo, hi = max(pos_start, base), min(end, base + c)
        if lo < hi:
            segs.append((int(s), lo - base, hi - base, lo - pos_start))
        base += c
        if base >= end:
            break
    return segs


class _EpochStream(torch.utils.data.IterableDataset):
    """One rank's batches for one epoch, from `position` on; split across DataLoader workers."""

    def __init__(self, shards, counts, data_cfg, model_cfg, batch, rank, world, epoch, position, workers):
        self.shards, self.counts, self.d, self.m = shards, counts, data_cfg, model_cfg
        self.batch, self.rank, self.world, self.epoch, self.position = batch, rank, world, epoch, position
        self.workers = workers

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        # the DataLoader starts its round-robin at worker 0 whatever the position: worker i plays the
        # part of the worker that owns batch position + i
        w = ((info.id if info is not None else 0) + self.position) % self.workers
        if info is not None:
            torch.set_num_threads(1)
        K, B = self.workers, self.batch
        order, nb, pieces = epoch_plan(self.counts, self.d.seed, self.epoch, self.rank, self.world, B, K)
        start, length, nbw = pieces[w]
        skip_batches = len(range(w, self.position, K))  # batches j < position with j % K == w
        if skip_batches >= nbw:
            return
        rng = np.random.default_rng([self.d.seed, self.epoch, self.rank, self.world, w, K, 11])
        perm = buffer_permutation(length, self.d.shuffle_buffer, rng)
        todo = perm[skip_batches * B:]
        needed = set(todo.tolist())
        segs = _locate(self.counts, order, start, length)
        reader = self._reader(segs, needed)
        pending: dict = {}
        last_good = None
        owed = 0  # failed samples waiting for the next good one to stand in
        xs, labels, keys, errors = [], [], [], 0
        for local in todo:
            local = int(local)
            while local not in pending:
                i, sample = next(reader)
                pending[i] = sample
            sample = pending.pop(local)
            item = None
            if sample is not None:
                rng_s = np.random.default_rng([self.d.seed, self.epoch, start + local, 13])
                try:
                    x, y = decode_sample(sample, self.m, rng_s, self.d.random_crop, self.d.hflip)
                    item = (x, y, sample["__key__"])
                except Exception:
                    item = None
            if item is None:
                errors += 1
                if last_good is None:
                    owed += 1
                    continue
                item = last_good
            else:
                last_good = item
            for _ in range(1 + owed):
                xs.append(item[0]); labels.append(item[1]); keys.append(item[2])
            owed = 0
            while len(xs) >= B:
                yield {"x": to_unit(torch.stack(xs[:B])), "label": torch.tensor(labels[:B], dtype=torch.long),
                       "key": keys[:B], "_errors": errors}
                xs, labels, keys, errors = xs[B:], labels[B:], keys[B:], 0
        if owed:  # nothing decodable at all in this worker's share
            raise DataError(f"no decodable sample in {len(todo)} samples of {self.d.shards}: check the shards "
                            f"with python -m data_tools.inspect {self.d.shards}")

    def _reader(self, segs, needed):
        """Yields (local index, raw sample or None if unreadable) for every needed local index."""
        for s, lo, hi, off in segs:
            url = self.shards[s]
            got = set()
            want = lambda i: lo <= i < hi and (i - lo + off) in needed  # noqa: E731
            if not any((i + off) in needed for i in range(hi - lo)):
                continue  # whole segment consumed before the resume point: not even opened
            try:
                for i, sample in read_tar_samples(url, want, stop=hi):
                    if sample is not None:
                        got.add(i)
                        yield i - lo + off, sample
            except Exception:
                pass  # truncated or corrupt from here: the missing samples count as errors below
            for i in range(lo, hi):
                if i not in got and (i - lo + off) in needed:
                    yield i - lo + off, None


class ShardLoader:
    """Batches forever, by epochs, for one rank; see the module docstring for order and state."""

    def __init__(self, data_cfg, model_cfg, batch_size: int, rank: int = 0, world_size: int = 1, state=None):
        if data_cfg.kind == "video" and model_cfg.frames <= 0:
            raise DataError("data.kind=video needs model.frames > 0 (frames per clip)")
        self.d, self.m = data_cfg, model_cfg
        self.batch, self.rank, self.world = int(batch_size), int(rank), int(world_size)
        self.workers = max(1, int(data_cfg.workers))
        self.shards, self.counts, self.manifest = list_shards(data_cfg.shards)
        self.total = sum(self.counts)
        self.batches_per_epoch = (self.total // self.world) // self.batch
        if self.batches_per_epoch == 0:
            raise DataError(f"{data_cfg.shards} has {self.total} samples: too few for {self.world} rank(s) x "
                            f"batch {self.batch}; use a smaller batch or more data")
        self.epoch, self.position = 0, 0
        self.stats = {"samples": 0, "errors": 0, "epoch": 0}
        if state:
            self.load_state_dict(state)

    def __len__(self):
        return self.batches_per_epoch

    def _layout(self):
        return {"world_size": self.world, "batch_size": self.batch, "workers": self.workers,
                "seed": self.d.seed, "total": self.total}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, **self._layout(),
                "samples": self.stats["samples"], "errors": self.stats["errors"]}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, pos = int(state.get("epoch", 0)), int(state.get("position", 0))
        old = {k: state.get(k, v) for k, v in self._layout().items()}
        if old != self._layout():
            # another layout: same fraction of the epoch, order re-derived for the new layout
            old_nb = max(1, (int(old["total"]) // int(old["world_size"])) // int(old["batch_size"]))
            pos = int(pos / old_nb * self.batches_per_epoch)
        self.position = min(pos, self.batches_per_epoch)
        self.stats["samples"] = int(state.get("samples", 0))
        self.stats["errors"] = int(state.get("errors", 0))
        self.stats["epoch"] = self.epoch

    def _loader(self):
        ds = _EpochStream(self.shards, self.counts, self.d, self.m, self.batch, self.rank, self.world,
                          self.epoch, self.position, self.workers)
        if self.d.workers == 0:
            return iter(ds)
        return iter(torch.utils.data.DataLoader(
            ds, batch_size=None, num_workers=self.d.workers, pin_memory=torch.cuda.is_available(),
            multiprocessing_context="fork" if "fork" in torch.multiprocessing.get_all_start_methods() else None,
        ))

    def __iter__(self):
        while True:
            if self.position >= self.batches_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
                self.stats["epoch"] = self.epoch
            for batch in self._loader():
                self.stats["errors"] += int(batch.pop("_errors"))
                self.stats["samples"] += len(batch["key"])
                self.position += 1
                self._check_errors()
                yield batch
                # a consumer that stopped here has received exactly `position` batches of this epoch
            if self.position < self.batches_per_epoch:
                raise DataError(f"epoch {self.epoch} ended after {self.position} of {self.batches_per_epoch} "
                                f"batches on rank {self.rank}: the shards changed under the run?")

    def _check_errors(self):
        s, e = self.stats["samples"], self.stats["errors"]
        if s >= MIN_SAMPLES_FOR_RATE and e > self.d.max_error_rate * s:
            raise DataError(f"{e} of {s} samples from {self.d.shards} failed to read or decode "
                            f"({e / s:.1%} > data.max_error_rate={self.d.max_error_rate}): check them with "
                            f"python -m data_tools.inspect {self.d.shards}, or raise data.max_error_rate")


def iter_samples(url: str, model_cfg):
    """(x, label, key) once through every shard in order; no augmentation, centre crop; bad samples skipped."""
    shards, _, _ = list_shards(url)
    for s in shards:
        try:
            for _, sample in read_tar_samples(s):
                try:
                    x, y = decode_sample(sample, model_cfg)
                except Exception:
                    continue
                yield to_unit(x), y, sample["__key__"]
        except (tarfile.TarError, OSError, EOFError):
            continue


def leading_frames(url: str, model_cfg, n: int) -> torch.Tensor:
    """(n, C, cond_frames, H, W): the given frames of the first n clips at url, cycled when there
    are fewer; what video samples are conditioned on outside the training stream."""
    clips = []
    for x, _, _ in iter_samples(url, model_cfg):
        clips.append(x[:, :model_cfg.cond_frames])
        if len(clips) == n:
            break
    if not clips:
        raise DataError(f"{url!r} gave no readable clips for the conditioning frames")
    return torch.stack([clips[i % len(clips)] for i in range(n)])
