"""The shard format (DESIGN.md, "Shards"): WebDataset tars plus a manifest, as data_tools writes
them and the data pipeline, the inspector and the eval service read them.

A sample is the run of tar members that share a key (webdataset's convention: the path up to the
first dot of the basename); members are `jpg`/`png`/`webp` or `mp4`, `cls`, `json`.
"""
from __future__ import annotations

import io
import json
import struct
import tarfile

from .storage import dirname, fs_path, join, open_read


MASK = "***"  # what config.dump_yaml writes in place of a secret


class DataError(RuntimeError):
    """Data that cannot be used; the message names the problem and the fix."""


class ListingError(DataError):
    """The shards could not be listed or counted (storage unreachable, access refused, no
    credentials here): no verdict on the data itself. The storage error is its __cause__."""


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
    fs, path = fs_path(url)
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
    fs, path = fs_path(url)
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


def manifest_of(url: str) -> dict:
    """The manifest of data.shards (a folder, a manifest URL or a brace pattern), {} when it has none;
    reads no tar."""
    if url.endswith(".json"):
        return read_manifest(url)
    base = dirname(_expand_braces(url)[0]) if "{" in url or url.endswith(".tar") else url.rstrip("/")
    man_url = find_manifest(base)
    return read_manifest(man_url) if man_url else {}


def ends_cleanly(f) -> bool:
    """Whether the tar open in the seekable binary stream f ends with the two zero blocks of its
    end-of-archive marker. A tar cut inside a header or on a 512-byte boundary otherwise reads as
    a shorter, valid tar (tarfile stops at the first header it cannot read), and without a
    manifest no count gives it away. Writers pad a tar with zeros to a whole record, so the last
    1024 bytes of any complete tar are zeros."""
    size = f.seek(0, io.SEEK_END)
    if size < 1024:
        return False
    f.seek(size - 1024)
    tail = f.read(1024)
    return len(tail) == 1024 and not tail.strip(b"\0")


def list_shards(url: str, check_ends: bool = False) -> tuple[list[str], list[int], dict]:
    """(shard URLs, sample counts, manifest or {}) for a folder, a manifest URL or a brace pattern.

    Without a manifest, counts come from reading every tar's headers once; with check_ends, a tar
    without its end-of-archive blocks (truncated, yet readable as a shorter tar) is a DataError too,
    as one that tarfile cannot read is. A storage failure is a ListingError, one line.
    """
    try:
        return _list_shards(url, check_ends)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any filesystem's errors: worded here, kept as the cause
        from .config import mask_secrets

        what = (str(e).strip().splitlines() or [""])[0][:300]
        raise ListingError(mask_secrets(f"cannot list the shards at {url} ({type(e).__name__}: {what}): check "
                                        f"the URL, the network and the credentials")) from e


def _list_shards(url: str, check_ends: bool) -> tuple[list[str], list[int], dict]:
    if not url:
        raise DataError("data.shards is empty: set data.shards=URL of a shard folder "
                        "(make one with: python -m data_tools.shard --embedded digits OUT)")
    if MASK in url:
        raise DataError(f"{url!r} holds a masked secret ({MASK}), as a saved config.yaml writes it: give the "
                        f"URL again (e.g. data.shards=URL), or put the credentials in the environment")
    wanted = None
    if url.endswith(".json"):
        man_url, base = url, dirname(url)
    elif "{" in url or url.endswith(".tar"):
        wanted = _expand_braces(url) if "{" in url else [url]
        base = dirname(wanted[0])
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
            fs, path = fs_path(base)
            protocol = url.split("://")[0] + "://" if "://" in url else ""
            wanted = sorted(protocol + p if protocol else p for p in fs.glob(path + "/*.tar"))
        if not wanted:
            raise DataError(f"no .tar shards and no manifest at {url}: make shards with data_tools.shard")
        shards, counts = wanted, []
        for s in shards:
            try:
                with open_read(s) as f:
                    counts.append(len(tar_keys(f)))
                    complete = ends_cleanly(f) if check_ends else True
                if not complete:
                    raise tarfile.ReadError(f"truncated after {counts[-1]} samples: no end-of-archive blocks")
            except FileNotFoundError:
                raise DataError(f"{s} does not exist: fix data.shards") from None
            except (tarfile.TarError, EOFError) as e:
                raise DataError(f"{s} is not a readable tar ({e}) and there is no manifest to skip it by: "
                                f"remove it, or re-shard with data_tools.shard (which writes a manifest)") from None
    return shards, counts, man


def read_tar_samples(url, wanted=None, stop=None):
    """Yields (index, sample dict) for the samples of one shard, in order, up to index `stop`.

    url: a shard URL, or a binary file object holding a tar (closed after). wanted(index) -> bool
    picks the samples whose data is read; the others are passed over by their tar headers. A
    truncated or corrupt tar raises (tarfile.TarError / OSError) where it breaks.
    """
    with (open_read(url) if isinstance(url, str) else url) as f, tarfile.open(fileobj=f, mode="r:") as tf:
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


def tar_bytes(samples: list[dict]) -> bytes:
    """Samples as a deterministic tar (mtime 0, members of a sample in sorted order)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for s in samples:
            for ext in sorted(k for k in s if k != "__key__"):
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size, info.mtime, info.mode = len(s[ext]), 0, 0o644
                tf.addfile(info, io.BytesIO(s[ext]))
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# The sample index: NAME.tar.idx beside each shard, for ranged reads of single samples

INDEX_SUFFIX = ".idx"


def index_url(shard_url: str) -> str:
    return shard_url + INDEX_SUFFIX


def tar_offsets(fileobj) -> list[int]:
    """Each sample's first byte in the tar (the header of its first member, extended headers
    included), then the end of the last sample's data: n + 1 offsets, the samples counted as
    read_tar_samples counts them. Reads headers only."""
    starts, end, cur_key = [], 0, None
    with tarfile.open(fileobj=fileobj, mode="r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            key = split_name(m.name)[0]
            if key != cur_key:
                starts.append(m.offset)
                cur_key = key
            end = m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return starts + [max(end, starts[-1] if starts else 0)]


def index_bytes(offsets) -> bytes:
    """The index file's bytes: the offsets as int64 little-endian."""
    return struct.pack(f"<{len(offsets)}q", *offsets)


def parse_index(data: bytes, count: int | None = None) -> list[int] | None:
    """The offsets in an index file, or None when it does not fit its shard (a sample count other
    than `count`, offsets not increasing, a torn file): that shard is then read front to back."""
    if len(data) < 8 or len(data) % 8:
        return None
    off = list(struct.unpack(f"<{len(data) // 8}q", data))
    if (count is not None and len(off) != count + 1) or off[0] < 0 or any(b <= a for a, b in zip(off, off[1:])):
        return None
    return off


def sample_from_bytes(data: bytes) -> dict:
    """The one sample in `data`: a sample's span [offset i, offset i + 1) cut from a tar. Raises
    (tarfile.TarError / OSError) unless its members fill the span exactly and make one sample: a
    span cut short, or an index that no longer fits its tar, is an error, not a wrong sample."""
    end = 0
    with tarfile.open(fileobj=io.BytesIO(data + bytes(2 * tarfile.BLOCKSIZE)), mode="r:") as tf:
        for m in tf:
            end = m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    got = list(read_tar_samples(io.BytesIO(data + bytes(2 * tarfile.BLOCKSIZE))))
    if len(got) != 1 or end != len(data):
        raise tarfile.ReadError(f"{len(got)} samples in {end} of {len(data)} bytes where the index has one sample")
    return got[0][1]
