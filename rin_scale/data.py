"""The streaming data pipeline: WebDataset tar shards from any fsspec URL, resumable to the sample.

    loader = ShardLoader(cfg.data, cfg.model, batch_size, rank, world_size, state=saved)
    for batch in loader: ...            # forever, by epochs; batch = {"x", "label", "key"}
    saved = loader.state_dict()         # JSON-able; what the consumer has received so far

"x" holds uint8 pixels (media.to_unit makes the model's [-1, 1] floats on the device): a quarter of
fp32's bytes through the workers' shared memory, pinned memory and the host-to-device copy
(25 MB instead of 101 MB for a micro-batch of 8 images at 1024x1024).

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

Labels. A conditional model (model.num_classes > 0) is checked against the manifest at start-up:
more classes in it than the model has, or a manifest that lists none, is a DataError. A sample
whose label lies outside [0, model.num_classes) is a sample error (it would index past the class
embedding, or train as the "no label" row); a sample without a label trains as unlabelled (-1).

Errors. An unreadable sample, or the rest of a truncated/corrupt shard, is counted in
stats["errors"] and replaced by the worker's previous good sample (so batch counts stay equal on
every rank); when errors exceed data.max_error_rate of the samples handed out, the loader stops
with a DataError.
"""
from __future__ import annotations

import sys
import tarfile

import numpy as np
import torch

from .media import IMAGE_EXTS, VIDEO_EXTS, decode_image, decode_video, to_unit
from .shards import DataError, list_shards, read_tar_samples
from .storage import Backoff, is_transient

MIN_SAMPLES_FOR_RATE = 200  # error-rate check waits for this many samples (one bad shard up front)


def decode_sample(sample: dict, model_cfg, rng=None, random_crop=False, hflip=False):
    """A raw sample {ext: bytes} -> (x uint8 tensor CHW or CTHW, label int). Raises if undecodable."""
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


def check_label(label: int, sample: dict, model_cfg) -> None:
    """Raises for a label a conditional model cannot take: one past its classes would index past the
    class embedding, one equal to model.num_classes would silently train as "no label"."""
    n = model_cfg.num_classes
    if n > 0 and "cls" in sample and not 0 <= label < n:
        raise ValueError(f"sample {sample.get('__key__')}: label {label} outside 0..{n - 1} (model.num_classes={n})")


def check_labels(man: dict, model_cfg, url: str) -> None:
    """A DataError when the manifest's classes do not fit a conditional model (see the module doc)."""
    n = model_cfg.num_classes
    if n <= 0 or not man or "classes" not in man:
        return  # unconditional, or nothing to compare with: each sample's label is checked as read
    classes = man.get("classes") or []
    if not classes:
        raise DataError(f"model.num_classes={n} but the manifest of {url} lists no classes (unlabelled data): "
                        f"set model.num_classes=0 to train unconditionally, or shard a folder of class folders")
    if len(classes) > n:
        raise DataError(f"the manifest of {url} lists {len(classes)} classes but model.num_classes={n}: "
                        f"set model.num_classes={len(classes)}")


# --------------------------------------------------------------------------------------------
# The shuffle buffer, on sample indices


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
                    check_label(y, sample, self.m)
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
                yield {"x": torch.stack(xs[:B]), "label": torch.tensor(labels[:B], dtype=torch.long),
                       "key": keys[:B], "_errors": errors}
                xs, labels, keys, errors = xs[B:], labels[B:], keys[B:], 0
        if owed:  # nothing decodable at all in this worker's share
            raise DataError(f"no decodable sample in {len(todo)} samples of {self.d.shards}: check the shards "
                            f"with python -m data_tools.check {self.d.shards}")

    def _reader(self, segs, needed):
        """Yields (local index, raw sample or None if unreadable) for every needed local index.

        Corrupt bytes end the shard there: the rest counts as errors. A storage outage does not:
        the shard is reopened past the samples already read, with backoff, for up to
        data.storage_retry_seconds; then the run stops with StorageUnavailable."""
        for s, lo, hi, off in segs:
            url = self.shards[s]
            got = set()
            want = lambda i: lo <= i < hi and (i - lo + off) in needed and i not in got  # noqa: E731
            if not any((i + off) in needed for i in range(hi - lo)):
                continue  # whole segment consumed before the resume point: not even opened
            backoff = Backoff(f"reading {url}", self.d.storage_retry_seconds, log=_log)
            while True:
                try:
                    for i, sample in read_tar_samples(url, want, stop=hi):
                        if sample is not None:
                            got.add(i)
                            yield i - lo + off, sample
                    break
                except Exception as e:  # noqa: BLE001 - classified here
                    if not is_transient(e):
                        break  # truncated or corrupt from here: the missing samples count as errors below
                    backoff.wait(e)
            for i in range(lo, hi):
                if i not in got and (i - lo + off) in needed:
                    yield i - lo + off, None


def _log(msg: str) -> None:
    print(f"[data] {msg}", file=sys.stderr, flush=True)


def check_dataset(data_cfg, model_cfg, batch_size: int, world_size: int = 1):
    """(shard URLs, sample counts, manifest) once everything the loader can check at start-up holds,
    else a one-line DataError: data.kind fits the model, the shards are listable and (without a
    manifest) every tar is complete, the classes fit the model, and every rank gets a batch."""
    if data_cfg.kind == "video" and model_cfg.frames <= 0:
        raise DataError("data.kind=video needs model.frames > 0 (frames per clip)")
    shards, counts, man = list_shards(data_cfg.shards, check_ends=True)
    check_labels(man, model_cfg, data_cfg.shards)
    total = sum(counts)
    if (total // world_size) // batch_size == 0:
        raise DataError(f"{data_cfg.shards} has {total} samples: too few for {world_size} rank(s) x "
                        f"batch {batch_size}; use a smaller batch or more data")
    return shards, counts, man


class ShardLoader:
    """Batches forever, by epochs, for one rank; see the module docstring for order and state."""

    def __init__(self, data_cfg, model_cfg, batch_size: int, rank: int = 0, world_size: int = 1, state=None):
        self.d, self.m = data_cfg, model_cfg
        self.batch, self.rank, self.world = int(batch_size), int(rank), int(world_size)
        self.workers = max(1, int(data_cfg.workers))
        self.shards, self.counts, self.manifest = check_dataset(data_cfg, model_cfg, self.batch, self.world)
        self.total = sum(self.counts)
        self.batches_per_epoch = (self.total // self.world) // self.batch
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
            # its own generator: starting the iterator must not draw the workers' base seed from the
            # global one, or a resumed run's noise stream would differ from the uninterrupted run's
            generator=torch.Generator().manual_seed(self.d.seed),
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
                            f"python -m data_tools.check {self.d.shards}, or raise data.max_error_rate")


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
