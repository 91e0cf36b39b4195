"""The streaming data pipeline: WebDataset tar shards from any fsspec URL, resumable to the sample.

    loader = ShardLoader(cfg.data, cfg.model, batch_size, rank, world_size, state=saved, global_batch=g)
    for batch in loader: ...            # forever, by epochs; batch = {"x", "label", "key"}
    saved = loader.state_dict()         # JSON-able; what the consumer has received so far

"x" holds uint8 pixels (media.to_unit makes the model's [-1, 1] floats on the device): a quarter of
fp32's bytes through the workers' shared memory, pinned memory and the host-to-device copy
(25 MB instead of 101 MB for a micro-batch of 8 images at 1024x1024).

Order. Each epoch has one global sample sequence, the same for every world size, batch size and
worker count (EpochOrder). The shards are shuffled with (seed, epoch) and cut into windows of W
consecutive shards; a window's samples are a uniform random merge of its W shards (each shard
read front to back), passed through a shuffle buffer of data.shuffle_buffer samples; the windows
follow each other. So a batch holds about as many shards as independent draws would, and shards
that each hold one class (sorted folders sharded by other tools, or by data_tools.shard before
it shuffled) still give batches of many classes: with one class per shard, a batch of B holds
about W (1 - (1 - 1/W)^B) classes. W is data.interleave when set, else 4 for
shards that data_tools.shard wrote shuffled (manifest options.shuffle) and 64 for any other: at
least 0.9 of independent draws for micro-batches up to 12 whatever the number of classes, 16
with up to 700 classes, 32 with up to 110 (window_width; a larger W mixes more, with more shards
open; the shard tool's shuffled shards need none of it).
Measured (bench/data_mixing.py, 20 classes x 60 images, shard size 60, 4 ranks x batch 32):
16.2 and 15.9 distinct classes per batch (tool-sharded folder, one class per shard) where
independent draws give 16.1; the shuffle buffer adds nothing to that, since the merge already
mixes: it only reorders samples within a shard from epoch to epoch.

The epoch is the longest whole number of global batches (ShardLoader's global_batch, the
trainer's train.global_batch; else batch x world size) of the sequence; the rest of it, under a
global batch, is not seen that epoch, and since the shard order changes each epoch, a different
part is left out each time. Global micro-batch j is positions [j G, (j + 1) G) with G = batch x
world size, rank r taking [j G + r batch, j G + (r + 1) batch). Within a rank, batch j comes from
DataLoader worker (j - position) % K, the order in which the DataLoader hands batches out.

What a worker reads. The sequence is computed on indices, a window at a time, before any byte is
read: a worker reads, per window, its own samples from the shards of that window that hold them.
A shard with a sample index (NAME.tar.idx beside NAME.tar: each sample's byte offset, int64;
data_tools.shard writes it with every shard, `python -m data_tools.index URL` adds it to shards
written by other tools or older versions) is read by ranged reads: its index once per worker (8
bytes a sample), then one request per run of consecutive wanted samples for exactly their bytes
(at most 8 MB a request, one sample at least), each sample parsed from its own span, so a corrupt
sample costs that sample only, and an outage retries only the runs not yet read. A shard without
one is read front to back once, passing the other members by their tar headers; on an object
store the 8 MB read buffer downloads the bytes it passes (up to half a shard per visit), and rank 0
says at start-up that the shards have no index and how to add one. At scale each worker reads a
small share of many shards: 512 ranks x 8 workers with a micro-batch of 8 on ImageNet (1,281
shards of ~1,000, ~110 KB a sample) means a global micro-batch of 4,096 every 4,096 positions, so
each worker reads one batch of 8 samples per 32,768 positions: per epoch ~312 samples (its 1/4,096
of 1.28M) in ~40 batches, the 8 of a batch from up to 8 shards. With the index that is its 312
samples plus an 8 KB index per shard visited: about 1.07x the dataset's 140 GB per epoch over all
workers; without it, tens of TB. Measured (bench/data_read_volume.py, 64 ranks x 2 workers, one
epoch): docs/data.md. At most W shards are open at once; a sample read before its turn
waits in memory: about data.shuffle_buffer x the worker's share of the samples. Augmentation draws from a generator
seeded by (seed, epoch, position in the sequence): a resumed run sees the same pixels too, at any
world size.

State = {"epoch", "position" (batches handed to the consumer this epoch by this rank), "consumed"
(samples of the epoch's sequence consumed by all ranks: position x batch x world size), and the
layout: "world_size", "batch_size", "workers", "global_batch", "seed", "total", "window",
"shuffle_buffer"}. Resuming continues the sequence at "consumed", exactly, whatever the new world
size, batch or worker count, so each sample of the epoch is seen once across the change; the
trainer saves between optimizer steps, where "consumed" is a whole number of global batches, which
any world size that can keep the global batch continues. A state whose "consumed" the new layout
cannot continue (not a whole number of its batch x world size) is a DataError naming world sizes
that can. Another dataset, seed, window or buffer (or a state from before the sequence was global)
means another sequence: the current epoch restarts at the same fraction, and within it some
samples may repeat and others be missed.

Labels. A sample's label is its `cls` member, or with data.label_key set, that field of its
`json` member (an int: img2dataset/video2dataset shards carry their metadata there). A conditional
model (model.num_classes > 0) is checked at start-up: against the manifest (more classes in it than
the model has, or a manifest that lists none, is a DataError), and on shards without a manifest (or
with data.label_key) against the first sample, which must carry a label. A sample whose label lies
outside [0, model.num_classes) is a sample error (it would index past the class embedding, or train
as the "no label" row); a sample without a label trains as unlabelled (-1).

Kind. An image model on video shards, or a video model on image shards, is a DataError at start-up
(the manifest's kind, else the first sample's members); a model.image_size above the manifest's
options.resize is a warning line (the images are upsampled).

Errors. An unreadable sample, or the rest of a truncated/corrupt shard, is counted in
stats["errors"] and replaced by the worker's previous good sample (so batch counts stay equal on
every rank); when errors exceed data.max_error_rate of the samples handed out, the loader stops
with a DataError.
"""
from __future__ import annotations

import json
import sys
import tarfile

import numpy as np
import torch

from .media import IMAGE_EXTS, VIDEO_EXTS, decode_image, decode_video, to_unit
from .shards import DataError, index_url, list_shards, parse_index, read_tar_samples, sample_from_bytes
from .storage import READ_BUFFER, Backoff, StorageUnavailable, exists, is_transient, read_bytes, read_range, retry

MIN_SAMPLES_FOR_RATE = 200  # error-rate check waits for this many samples (one bad shard up front)


def sample_label(sample: dict, label_key: str = "") -> int | None:
    """A raw sample's label: its cls member, or with label_key (data.label_key) that field of its json
    member, an int; None when it carries none. Raises ValueError for a value that is not an int."""
    if not label_key:
        return int(sample["cls"]) if "cls" in sample else None
    if "json" not in sample:
        return None
    meta = json.loads(sample["json"])
    value = meta.get(label_key) if isinstance(meta, dict) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().lstrip("-").isdigit():
        raise ValueError(f"sample {sample.get('__key__')}: json field {label_key!r} is {value!r}, not a class index")
    return int(value)


def decode_sample(sample: dict, model_cfg, rng=None, random_crop=False, hflip=False, label_key=""):
    """A raw sample {ext: bytes} -> (x uint8 tensor CHW or CTHW, label int, -1 = none). Raises if undecodable."""
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
    label = sample_label(sample, label_key)
    return x, -1 if label is None else label


def check_label(label: int, sample: dict, model_cfg, label_key: str = "") -> None:
    """Raises for a label a conditional model cannot take: one past its classes would index past the
    class embedding, one equal to model.num_classes would silently train as "no label"."""
    n = model_cfg.num_classes
    if n > 0 and sample_label(sample, label_key) is not None and not 0 <= label < n:
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
# The epoch's global sample sequence: the same for every world size and worker count

WINDOW_SORTED = 64  # shards mixed at a time when their order may be sorted (one class per shard)
WINDOW_MIXED = 4  # ... for shards the shard tool wrote from a shuffled item list


def window_width(data_cfg, manifest: dict) -> int:
    """Shards mixed at a time: data.interleave when set, else by the shards' origin.
    Not from the batch size: the sequence must not change when a resume at another world size
    changes the micro-batch. With one class per shard, a batch of B from W shards holds
    W (1 - (1 - 1/W)^B) classes: W >= 5 B keeps that at 0.9 of independent draws or more however
    many classes there are (W = 64: micro-batches up to 12, and more with fewer classes)."""
    if data_cfg.interleave > 0:
        return data_cfg.interleave
    return WINDOW_MIXED if (manifest.get("options") or {}).get("shuffle") else WINDOW_SORTED


def _members(labels: np.ndarray) -> np.ndarray:
    """For a sequence of shard ids, each entry's index within its shard (its count so far)."""
    idx = np.argsort(labels, kind="stable")
    ordered = labels[idx]
    out = np.empty(len(labels), np.int64)
    out[idx] = np.arange(len(labels)) - np.searchsorted(ordered, ordered, side="left")
    return out


class EpochOrder:
    """Global position in the epoch -> (shard, member), computed on indices before any byte is read.

    The shards are shuffled with (seed, epoch) and cut into windows of `width` consecutive shards;
    a window's positions are a uniform random merge of its shards (each shard read front to back)
    passed through a shuffle buffer of `buffer` samples. A window is derived on its own, when first
    needed, so a worker computes only the windows it reads from."""

    def __init__(self, counts, seed: int, epoch: int, width: int, buffer: int):
        self.counts, self.seed, self.epoch, self.buffer = np.asarray(counts, np.int64), seed, epoch, buffer
        order = np.random.default_rng([seed, epoch, 7]).permutation(len(counts))
        self.windows = [order[i:i + width] for i in range(0, len(order), width)]
        self.starts = np.cumsum([0] + [int(self.counts[w].sum()) for w in self.windows])
        self._cached = (-1, None)

    def window_of(self, pos: int) -> int:
        return int(np.searchsorted(self.starts, pos, side="right")) - 1

    def window(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard, member) for each position of window k, in sequence order."""
        if self._cached[0] != k:
            rng = np.random.default_rng([self.seed, self.epoch, k, 17])
            shards = self.windows[k]
            labels = rng.permutation(np.repeat(shards, self.counts[shards]))
            members = _members(labels)
            perm = buffer_permutation(len(labels), self.buffer, rng)
            self._cached = (k, (labels[perm], members[perm]))
        return self._cached[1]


def epoch_batches(total: int, batch: int, world: int, unit: int) -> int:
    """Batches per rank per epoch: the epoch is the longest multiple of `unit` (the global batch)
    samples, cut into global micro-batches of batch x world."""
    return (total // unit) * unit // (batch * world)


def positions(rank: int, world: int, batch: int, j: int) -> np.ndarray:
    """Global positions of rank's batch j: global micro-batch j is [j*G, (j+1)*G), split by rank."""
    return j * batch * world + rank * batch + np.arange(batch)


class _EpochStream(torch.utils.data.IterableDataset):
    """One rank's batches for one epoch, from `position` on; split across DataLoader workers."""

    indexed = True  # whether the shards may have sample indexes (ShardLoader checks the first at start-up)

    def __init__(self, shards, counts, data_cfg, model_cfg, batch, rank, world, epoch, position, nb, width):
        self.shards, self.counts, self.d, self.m = shards, counts, data_cfg, model_cfg
        self.batch, self.rank, self.world, self.epoch, self.position = batch, rank, world, epoch, position
        self.nb, self.width = nb, width

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        # the DataLoader hands batches out round-robin starting at worker 0: worker i reads the
        # rank's batches position + i, position + i + K, ...
        wid, k = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        B = self.batch
        mine = range(self.position + wid, self.nb, k)
        if not len(mine):
            return
        order = EpochOrder(self.counts, self.d.seed, self.epoch, self.width, self.d.shuffle_buffer)
        pos = np.concatenate([positions(self.rank, self.world, B, j) for j in mine])
        last_good = None
        owed = 0  # failed samples waiting for the next good one to stand in
        xs, labels, keys, errors = [], [], [], 0
        for p, sample in self._samples(order, pos):
            item = None
            if sample is not None:
                rng_s = np.random.default_rng([self.d.seed, self.epoch, int(p), 13])
                try:
                    x, y = decode_sample(sample, self.m, rng_s, self.d.random_crop, self.d.hflip,
                                         self.d.label_key)
                    check_label(y, sample, self.m, self.d.label_key)
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
            raise DataError(f"no decodable sample in {len(pos)} samples of {self.d.shards}: check the shards "
                            f"with python -m data_tools.check {self.d.shards}")

    def _samples(self, order: EpochOrder, pos: np.ndarray):
        """Yields (position, raw sample or None if unreadable) for the given increasing positions.

        A window at a time: every shard of it that holds one of these samples gets one reader, read
        front to back once, passing the other members by their headers; a sample read before its
        turn waits in `pending` (the shuffle buffer's reach: about data.shuffle_buffer x the share
        of the samples this worker reads)."""
        win = np.array([order.window_of(int(p)) for p in pos[[0, -1]]])
        for k in range(int(win[0]), int(win[1]) + 1):
            lo, hi = order.starts[k], order.starts[k + 1]
            here = pos[(pos >= lo) & (pos < hi)]
            if not len(here):
                continue
            shard_of, member_of = order.window(k)
            s_here, m_here = shard_of[here - lo], member_of[here - lo]
            wanted: dict = {}
            for s, m in zip(s_here.tolist(), m_here.tolist()):
                wanted.setdefault(s, set()).add(m)
            readers = {s: self._shard(s, ms) for s, ms in wanted.items()}
            pending: dict = {}
            for p, s, m in zip(here.tolist(), s_here.tolist(), m_here.tolist()):
                while (s, m) not in pending:
                    i, sample = next(readers[s])
                    pending[(s, i)] = sample
                yield p, pending.pop((s, m))
            for r in readers.values():
                r.close()

    def _shard(self, s: int, wanted: set):
        """Yields (member, raw sample or None if unreadable) for the wanted members of shard s, in order.

        With the shard's index, by ranged reads (_shard_ranged). Without: front to back; corrupt
        bytes end the shard there: the rest counts as errors. A storage outage does not:
        the shard is reopened past the samples already read, with backoff, for up to
        data.storage_retry_seconds; then the run stops with StorageUnavailable."""
        offsets = self._offsets(s)
        if offsets is not None:
            yield from self._shard_ranged(s, sorted(wanted), offsets)
            return
        url, stop = self.shards[s], max(wanted) + 1
        got: set = set()
        backoff = Backoff(f"reading {url}", self.d.storage_retry_seconds, log=_log)
        while True:
            try:
                for i, sample in read_tar_samples(url, lambda i: i in wanted and i not in got, stop=stop):
                    if sample is not None:
                        got.add(i)
                        yield i, sample
                break
            except Exception as e:  # noqa: BLE001 - classified here
                if not is_transient(e):
                    break  # truncated or corrupt from here: the missing samples count as errors below
                backoff.wait(e)
        for i in sorted(wanted - got):
            yield i, None

    def _offsets(self, s: int):
        """Shard s's sample offsets from its index, fetched once per worker; None without a usable one."""
        cache = self.__dict__.setdefault("_index_cache", {})
        if s not in cache:
            cache[s] = None
            if self.indexed:
                url = index_url(self.shards[s])
                try:
                    data = retry(lambda: read_bytes(url), f"reading {url}", self.d.storage_retry_seconds, log=_log)
                    cache[s] = parse_index(data, self.counts[s])
                except StorageUnavailable:
                    raise
                except Exception:  # noqa: BLE001 - no index (or an unreadable one): read front to back
                    pass
        return cache[s]

    def _shard_ranged(self, s: int, wanted: list, offsets: list):
        """_shard for an indexed shard: one ranged read per run of consecutive wanted members
        (sample_runs), each sample parsed from its own span (a corrupt one is an error alone).
        A storage outage retries the run, with backoff, for up to data.storage_retry_seconds
        (the runs already read are not read again); any other failure makes the run's samples errors."""
        url = self.shards[s]
        backoff = Backoff(f"reading {url}", self.d.storage_retry_seconds, log=_log)
        for a, b in sample_runs(wanted, offsets, READ_BUFFER):
            while True:
                try:
                    data = read_range(url, offsets[a], offsets[b])
                    break
                except Exception as e:  # noqa: BLE001 - classified here
                    if not is_transient(e):
                        data = b""
                        break
                    backoff.wait(e)
            for i in range(a, b):
                try:
                    sample = sample_from_bytes(data[offsets[i] - offsets[a]:offsets[i + 1] - offsets[a]])
                except Exception:  # noqa: BLE001 - corrupt or cut short: this sample only
                    sample = None
                yield i, sample


def sample_runs(wanted: list, offsets: list, max_bytes: int) -> list[tuple[int, int]]:
    """Sorted member indices -> [(a, b)]: runs of consecutive members, each one ranged read of bytes
    [offsets[a], offsets[b]), cut where a run would pass max_bytes (one member at least)."""
    runs: list = []
    for i in wanted:
        if runs and runs[-1][1] == i and offsets[i + 1] - offsets[runs[-1][0]] <= max_bytes:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(a, b) for a, b in runs]


def shards_indexed(shards: list, url: str, say: bool) -> bool:
    """Whether the shards have sample indexes, by the first shard's (one request); `say`: tell, once,
    when they have none, and how to add them."""
    try:
        found = exists(index_url(shards[0]))
    except Exception:  # noqa: BLE001 - cannot tell here: each worker tries each shard's index
        return True
    if not found and say:
        _log(f"the shards at {url} have no sample index (NAME.tar.idx): each worker reads a shard from its "
             f"start up to its samples, which on an object store downloads much of the shard per visit; "
             f"add the indexes once with: python -m data_tools.index {url}")
    return found


def _log(msg: str) -> None:
    print(f"[data] {msg}", file=sys.stderr, flush=True)


class _Probe:
    """The first sample of the first non-empty shard ({ext: bytes}), read once when first asked for;
    None when there is none or it cannot be read (the loader then counts it as a sample error)."""

    def __init__(self, shards, counts):
        self.shards, self.counts, self._sample = shards, counts, False

    def get(self) -> dict | None:
        if self._sample is False:
            self._sample = None
            for url, n in zip(self.shards, self.counts):
                if n:
                    try:
                        self._sample = next((smp for _, smp in read_tar_samples(url, stop=1)), None)
                    except Exception:  # noqa: BLE001 - unreadable: the loader's own errors say so
                        pass
                    break
        return self._sample


def _member(sample: dict | None, exts) -> str | None:
    return next((e for e in (sample or {}) if e in exts), None)


def check_kind(man: dict, first: _Probe, model_cfg, url: str) -> None:
    """A DataError when the shards hold the other kind of data than the model takes: the manifest's
    kind, else the first sample's members (one with what the model reads is fine, whatever else it
    holds; one with neither kind is left to the loader)."""
    video = model_cfg.frames > 0
    kind = man.get("kind")
    if kind in ("image", "video"):
        if (kind == "video") == video:
            return
        other = _member(first.get(), VIDEO_EXTS if kind == "video" else IMAGE_EXTS) or "its manifest's kind"
    else:
        sample = first.get()
        if _member(sample, VIDEO_EXTS if video else IMAGE_EXTS):
            return
        other = _member(sample, IMAGE_EXTS if video else VIDEO_EXTS)
        if other is None:
            return
    if not video:
        raise DataError(f"data.shards={url} holds video clips ({other}) but the model is an image model: "
                        f"use a video preset (model.frames > 0, data.kind=video) or image shards")
    raise DataError(f"data.shards={url} holds images ({other}) but the model is a video model "
                    f"(model.frames={model_cfg.frames}): use an image preset (model.frames=0, data.kind=image) "
                    f"or video shards")


def check_sample_labels(first: _Probe, model_cfg, data_cfg) -> None:
    """Shards without a manifest (or labelled by data.label_key): a conditional model needs the
    first sample to carry a label; else the run would train on label -1 throughout."""
    n, key, url = model_cfg.num_classes, data_cfg.label_key, data_cfg.shards
    sample = first.get()
    if n <= 0 or sample is None:
        return
    try:
        label = sample_label(sample, key)
    except ValueError as e:
        raise DataError(f"data.label_key={key}: {e}: name a json field that holds the class index") from None
    if label is not None:
        return
    if key:
        raise DataError(f"model.num_classes={n} but sample {sample['__key__']} of {url} has no label (no json "
                        f"field {key!r}): set data.label_key to the json field that holds the class index, "
                        f"or model.num_classes=0 to train unconditionally")
    raise DataError(f"model.num_classes={n} but sample {sample['__key__']} of {url} has no label (no cls member): "
                    f"set data.label_key=FIELD to take labels from each sample's json, or model.num_classes=0 "
                    f"to train unconditionally")


def dataset_warnings(man: dict, model_cfg, url: str) -> list[str]:
    """Lines worth a warning at start-up, not an error: a model.image_size above the size the shard
    tool resized the images to (manifest options.resize), which upsamples every image."""
    resize = int((man.get("options") or {}).get("resize") or 0)
    if resize and model_cfg.image_size > resize:
        return [f"model.image_size={model_cfg.image_size} is larger than the shards' resize={resize} ({url}): "
                f"every sample is upsampled; re-shard with --resize {model_cfg.image_size} or set "
                f"model.image_size={resize}"]
    return []


def check_dataset(data_cfg, model_cfg, batch_size: int, world_size: int = 1):
    """(shard URLs, sample counts, manifest) once everything the loader can check at start-up holds,
    else a one-line DataError: data.kind fits the model, the shards are listable and (without a
    manifest) every tar is complete, they hold the model's kind of data (images or clips), the
    classes fit the model (or, without a manifest, the first sample carries a label when the model
    is conditional), and every rank gets a batch."""
    if data_cfg.kind == "video" and model_cfg.frames <= 0:
        raise DataError("data.kind=video needs model.frames > 0 (frames per clip)")
    shards, counts, man = list_shards(data_cfg.shards, check_ends=True)
    first = _Probe(shards, counts)
    check_kind(man, first, model_cfg, data_cfg.shards)
    if man and not data_cfg.label_key:
        check_labels(man, model_cfg, data_cfg.shards)
    else:
        check_sample_labels(first, model_cfg, data_cfg)
    total = sum(counts)
    if (total // world_size) // batch_size == 0:
        raise DataError(f"{data_cfg.shards} has {total} samples: too few for {world_size} rank(s) x "
                        f"batch {batch_size}; use a smaller batch or more data")
    return shards, counts, man


class ShardLoader:
    """Batches forever, by epochs, for one rank; see the module docstring for order and state.

    global_batch: the trainer's global batch (micro-batch x accumulation x world size); the epoch is
    a whole number of them, so states saved between optimizer steps resume at any world size."""

    def __init__(self, data_cfg, model_cfg, batch_size: int, rank: int = 0, world_size: int = 1, state=None,
                 global_batch: int | None = None):
        self.d, self.m = data_cfg, model_cfg
        self.batch, self.rank, self.world = int(batch_size), int(rank), int(world_size)
        self.workers = max(1, int(data_cfg.workers))
        self.unit = int(global_batch or self.batch * self.world)
        if self.unit % (self.batch * self.world):
            raise DataError(f"global batch {self.unit} is not a multiple of batch {self.batch} x {self.world} rank(s)")
        self.shards, self.counts, self.manifest = check_dataset(data_cfg, model_cfg, self.batch, self.world)
        if self.rank == 0:
            for line in dataset_warnings(self.manifest, model_cfg, data_cfg.shards):
                _log(f"warning: {line}")
        self.total = sum(self.counts)
        self.width = window_width(data_cfg, self.manifest)
        self.indexed = shards_indexed(self.shards, data_cfg.shards, say=self.rank == 0)
        self.batches_per_epoch = epoch_batches(self.total, self.batch, self.world, self.unit)
        if self.batches_per_epoch == 0:
            raise DataError(f"{data_cfg.shards} has {self.total} samples: fewer than the global batch {self.unit}; "
                            f"use a smaller batch or more data")
        self.epoch, self.position = 0, 0
        self.stats = {"samples": 0, "errors": 0, "epoch": 0}
        if state:
            self.load_state_dict(state)

    def __len__(self):
        return self.batches_per_epoch

    def _sequence(self):
        """What fixes the epoch's global sample sequence (any world size, batch or worker count reads it)."""
        return {"seed": self.d.seed, "total": self.total, "window": self.width, "shuffle_buffer": self.d.shuffle_buffer}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "consumed": self.position * self.batch * self.world,
                "world_size": self.world, "batch_size": self.batch, "workers": self.workers,
                "global_batch": self.unit, **self._sequence(),
                "samples": self.stats["samples"], "errors": self.stats["errors"]}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state.get("epoch", 0))
        if "consumed" in state and {k: state.get(k) for k in self._sequence()} == self._sequence():
            pos = self._continue(int(state["consumed"]))  # exact, at any world size, batch or worker count
        else:
            # another sequence (seed, data, window, buffer, or a state from before it was global):
            # the same fraction of the epoch, so within it some samples may repeat and others be missed
            old_nb = max(1, (int(state.get("total", self.total)) // int(state.get("world_size", self.world)))
                         // int(state.get("batch_size", self.batch)))
            pos = int(int(state.get("position", 0)) / old_nb * self.batches_per_epoch)
        self.position = min(pos, self.batches_per_epoch)
        self.stats["samples"] = int(state.get("samples", 0))
        self.stats["errors"] = int(state.get("errors", 0))
        self.stats["epoch"] = self.epoch

    def _continue(self, consumed: int) -> int:
        """This rank's batch position after `consumed` samples of the epoch's sequence."""
        g = self.batch * self.world
        if consumed % g:
            near = [w for w in range(1, 4 * self.world + 1) if consumed % (self.batch * w) == 0
                    and self.unit % (self.batch * w) == 0]
            near = sorted(near, key=lambda w: (abs(w - self.world), w))[:2]
            raise DataError(f"epoch {self.epoch} was saved after {consumed} samples, not a whole number of "
                            f"batches of {self.batch} x {self.world} rank(s): resume on "
                            f"{' or '.join(map(str, sorted(near))) or 'the old number of'} rank(s)")
        return consumed // g

    def _loader(self):
        ds = _EpochStream(self.shards, self.counts, self.d, self.m, self.batch, self.rank, self.world,
                          self.epoch, self.position, self.batches_per_epoch, self.width)
        ds.indexed = self.indexed
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
