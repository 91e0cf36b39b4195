"""Write WebDataset tar shards plus a manifest to any fsspec URL.

    python -m data_tools.shard SOURCE OUT [--prefix data] [--shard-size 1000] [--resize 256] ...
    python -m data_tools.shard --embedded digits --split train OUT
    python -m data_tools.shard SOURCE OUT --part I/N ...   (on N machines at once, I = 0..N-1)
    python -m data_tools.shard --join OUT                  (one manifest over the N parts)

SOURCE: a folder of images (class subfolders become labels; a flat folder is unlabelled), a folder
of videos, or a list file (below).
OUT gets PREFIX-000000.tar, ... and PREFIX-manifest.json. Deterministic: the same input gives the
same bytes and keys. Items are shuffled with a fixed seed before writing (--no-shuffle keeps
sorted order), so that a folder sorted by class gives shards that each hold every class; for videos
the source list is shuffled (the clips of one video stay together in one shard). A shard appears
under its final name only when complete (rin_scale.storage's atomic writes); PREFIX-progress.json
records finished shards, so re-running after a crash carries on after the last complete shard.
Re-running a finished job on the same source writes nothing and says so; if files were added to or
removed from the source since, it stops in one line (N new, M gone) and writes nothing: shard into
another folder, or delete PREFIX-* in OUT and run again (the shuffled order, and so every shard,
depends on the whole listing: the new files cannot be appended without making a dataset that a
fresh run would not write). PREFIX-inputs.txt.gz lists the inputs in key order (line k: key k).
Unreadable files (corrupt, truncated, an mp4 with no video stream) are skipped and listed under
'errors' in the manifest, one line each; so are the few files without a class when most have one
(a stray README.jpg beside the class folders). Images are stored as 8-bit RGB/L/RGBA, as the
loader trains on uint8: a 16-bit PNG is scaled to 8 bits (v * 255 / 65535, rounded) and counted in
the manifest's 'converted_16bit'; the EXIF orientation is applied.

List files (.txt .lst .list .csv .tsv, or any file given as SOURCE): one input a line, a path
(relative to the list file's folder) or a URL, optionally followed by its label: `path<TAB>label`
or `path,label` (CSV quoting allowed; extra columns are ignored). The delimiter is detected (.csv:
comma, .tsv: tab, else tab if any line has one, else comma if lines read as `file,label`) or set
by --delimiter. A header row is detected (its first field is a column name such as path, file,
url, image, and not a file name) or set by --header yes|no; with a header, the path and label
columns are found by name (path/file/filename/url/image/video/src..., label/class/cls/target/...).
Labels that are all non-negative integers are class indices as written (label 2 is class 2; the
manifest lists classes "0".."max"); other labels are class names, numbered in sorted order
(--labels index|name forces either). Blank lines and lines starting with # are skipped.

Several machines (--part I/N): part I of N writes the I-th of N equal slices of the shuffled item
list as PREFIX-pIIIIofNNNN-000000.tar ..., with its own progress file (resumable per part) and,
when done, PREFIX-pIIIIofNNNN.json. Every part lists the whole source, so all compute the same
class map (sorted class names, or the indices) and the same keys; the part that finishes last
joins them into PREFIX-manifest.json (or run --join OUT), checking that all parts agree. --part auto
takes I and N from RANK/WORLD_SIZE, a SLURM array (SLURM_ARRAY_TASK_ID) or SLURM_PROCID/SLURM_NTASKS;
`python -m launch.submit --service shard SOURCE OUT [options] --nodes N` runs it on N SLURM nodes.
--classes FILE fixes the class map (a manifest, a JSON list or one name a line) for data sharded
in separate runs that must share one map.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys

import numpy as np
from PIL import Image, ImageOps

from data_tools.index import write_shard
from rin_scale.media import VideoReader, encode_image, encode_mp4, resize_crop
from rin_scale.shards import tar_bytes
from rin_scale.storage import StorageUnavailable, fs_path, join, read_json, write_bytes, write_json

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")


class ShardError(RuntimeError):
    pass


class Skip(str):
    """An item's data that says why it is left out: listed in the manifest's errors, not encoded."""


# --------------------------------------------------------------------------------------------
# Sources: lists of (source, label-name, None or Skip)


def _scheme(url: str) -> str:
    return url.split("://")[0] + "://" if "://" in url and not url.startswith("file://") else ""


def list_folder(url: str, kind: str = "auto"):
    """(kind, [(url, class name or None)], class names) for a folder, files in sorted order."""
    fs, root = fs_path(url)
    if not fs.isdir(root):
        raise ShardError(f"{url} is not a folder or a list file: give a folder of images/videos or a .txt list")
    root = root.rstrip("/")
    files = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_SUFFIXES + VIDEO_SUFFIXES))
    n_img = sum(p.lower().endswith(IMAGE_SUFFIXES) for p in files)
    n_vid = len(files) - n_img
    if kind == "auto":
        if n_img and n_vid:
            raise ShardError(f"{url} holds {n_img} images and {n_vid} videos: choose one with --kind image|video")
        kind = "video" if n_vid else "image"
    suffixes = VIDEO_SUFFIXES if kind == "video" else IMAGE_SUFFIXES
    files = [p for p in files if p.lower().endswith(suffixes)]
    if not files:
        raise ShardError(f"no {kind} files under {url} (looked for {', '.join(suffixes)})")
    rel = [p[len(root) + 1:] for p in files]
    scheme = _scheme(url)
    pairs = [(scheme + p, r.split("/", 1)[0] if "/" in r else None) for p, r in zip(files, rel)]
    return (kind, *_labels(pairs, f"{kind} files under {url}", "are in class subfolders",
                           "at the top, outside the class subfolders"))


LIST_SUFFIXES = (".txt", ".lst", ".list", ".csv", ".tsv")
PATH_COLUMNS = ("path", "file", "filename", "file_name", "filepath", "file_path", "url", "uri", "image",
                "image_path", "img", "video", "video_path", "src", "source", "location", "key")
LABEL_COLUMNS = ("label", "labels", "class", "cls", "class_name", "classname", "class_id", "category",
                 "target", "y", "label_id", "synset")
_INT = re.compile(r"[+-]?\d+")


def _media_like(s: str) -> bool:
    return s.strip().lower().endswith(IMAGE_SUFFIXES + VIDEO_SUFFIXES)


def parse_list(text: str, name: str = "", delimiter: str = "auto", header: str = "auto"):
    """[(path, label text or None)] from a list file's text: see the module doc ("List files")."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        return []
    if delimiter == "auto":
        low = name.lower()
        if low.endswith(".csv"):
            delimiter = ","
        elif low.endswith(".tsv") or any("\t" in ln for ln in lines):
            delimiter = "\t"
        else:  # `file,label` lines, not file names that hold a comma
            body = lines[1:] if len(lines) > 1 else lines
            comma = [ln for ln in body if "," in ln and not _media_like(ln)
                     and _media_like(next(csv.reader([ln]))[0])]
            delimiter = "," if 2 * len(comma) > len(body) else "plain"
    else:
        delimiter = {"tab": "\t", "tsv": "\t", "comma": ",", "csv": ","}.get(delimiter, delimiter)
    if delimiter == "plain":
        rows = [[ln.strip()] for ln in lines]
    else:
        rows = [[f.strip() for f in r] for r in csv.reader(lines, delimiter=delimiter)]
        rows = [r for r in rows if r and any(r)]
    first = [f.lower() for f in rows[0]]
    if header == "auto":
        rest = rows[1:]
        header = "yes" if rest and not any(_media_like(f) for f in rows[0]) and (
            any(f in PATH_COLUMNS + LABEL_COLUMNS for f in first)
            or 2 * sum(any(_media_like(f) for f in r) for r in rest) > len(rest)) else "no"
    path_col, label_col = 0, 1
    if header == "yes":
        path_col = next((first.index(c) for c in PATH_COLUMNS if c in first), 0)
        label_col = next((first.index(c) for c in LABEL_COLUMNS if c in first), 1 if path_col != 1 else 0)
        if len(first) == 1:
            label_col = None
        rows = rows[1:]
    out = []
    for r in rows:
        label = r[label_col] if label_col is not None and label_col < len(r) and label_col != path_col else ""
        out.append((r[path_col] if path_col < len(r) else "", label or None))
    return [(p, lab) for p, lab in out if p]


def list_file(url: str, kind: str = "auto", delimiter: str = "auto", header: str = "auto", labels: str = "auto"):
    """(kind, [(url, class name or None)], class names) for a list file (module doc: "List files")."""
    fs, path = fs_path(url)
    with fs.open(path, "r") as f:
        text = f.read()
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    items = []
    for src, label in parse_list(text, url, delimiter, header):
        if "://" not in src and not src.startswith("/"):
            src = base + "/" + src
        items.append((src, label))
    if not items:
        raise ShardError(f"{url} lists no files")
    named = [lab for _, lab in items if lab is not None]
    numeric = bool(named) and all(_INT.fullmatch(lab) for lab in named)
    if labels == "index" and not numeric and named:
        bad = next(lab for lab in named if not _INT.fullmatch(lab))
        raise ShardError(f"--labels index: label {bad!r} in {url} is not a class index (a whole number)")
    index = numeric and labels != "name"
    if index:
        values = [int(lab) for lab in named]
        if min(values) < 0:
            raise ShardError(f"label {min(values)} in {url}: class indices start at 0 (or use --labels name)")
        items = [(s, None if lab is None else str(int(lab))) for s, lab in items]
    if kind == "auto":
        kind = "video" if all(s.lower().endswith(VIDEO_SUFFIXES) for s, _ in items) else "image"
    pairs, classes = _labels(items, f"lines of {url}", "have a label", "without a label")
    if index and classes:  # label 2 is class 2: the map runs 0..max, whatever labels are absent
        classes = [str(i) for i in range(max(int(c) for c in classes) + 1)]
    return kind, pairs, classes


def _labels(pairs, where, have, lacking):
    """(pairs, class names) for [(src, class or None)]: labelled when most items have a class.

    The few without one get a Skip for a class (a stray file must not drop every label); the classes
    of a few are dropped when most have none; either way with a one-line warning, never silently.
    """
    n, total = sum(c is not None for _, c in pairs), len(pairs)
    if 2 * n <= total:
        if n:
            print(f"warning: only {n} of {total} {where} {have}: writing all {total} unlabelled", file=sys.stderr)
        return [(s, None) for s, _ in pairs], []
    stray = [s.rsplit("/", 1)[-1] for s, c in pairs if c is None]
    if stray:
        print(f"warning: skipped {len(stray)} of {total} {where} {lacking} ({', '.join(stray[:3])}"
              f"{', ...' if len(stray) > 3 else ''}): they have no class; listed under 'errors' in the manifest",
              file=sys.stderr)
    skip = Skip(f"no class: {lacking}")
    return [(s, skip if c is None else c) for s, c in pairs], sorted({c for _, c in pairs if c is not None})


# --------------------------------------------------------------------------------------------
# Encoding one source item into samples (runs in worker processes)


def _read(src: str) -> bytes:
    fs, path = fs_path(src)
    with fs.open(path, "rb") as f:
        return f.read()


def _png_bits(data) -> int:
    """The bit depth a PNG's header gives (IHDR), 0 for other data: Pillow opens a 16-bit RGB(A)
    PNG as 8-bit RGB(A) without saying so, and only this byte tells."""
    return data[24] if isinstance(data, bytes) and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24 else 0


def _upright_8bit(img: Image.Image, bits: int = 0) -> tuple[Image.Image, bool]:
    """(the image as a viewer shows it, in 8 bits; whether that differs from the stored bytes).

    Decoders (Pillow's included) ignore EXIF orientation, and convert() clips 16-bit grey to 255,
    which turns a 16-bit PNG all white: 16-bit grey is scaled by 255/65535 (rounded). Pillow itself
    reduces 16-bit RGB(A) to 8 bits on load; either way the stored image is 8-bit (bits == 16 marks
    it changed, so the source's 16-bit bytes are never copied into a shard as they are).
    """
    changed = img.getexif().get(0x0112, 1) != 1  # the EXIF Orientation tag
    if changed:
        img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I"):  # "I;16", "I;16B", "I": 16-bit grey
        arr = np.asarray(img).astype(np.float64) * (255 / 65535)
        img, changed = Image.fromarray(np.round(arr).clip(0, 255).astype(np.uint8), "L"), True
    return img, changed or bits == 16


def encode_image_item(key, src, data, label, opts):
    """-> list of samples. `data`: raw bytes, or an HxWx3 uint8 array (embedded sets)."""
    bits = 0
    if isinstance(data, np.ndarray):
        img, src_ext, raw = Image.fromarray(data), None, None
    else:
        img = Image.open(io.BytesIO(data))
        img.load()  # raises on truncated or corrupt files
        src_ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(img.format)
        bits = _png_bits(data)
        img, changed = _upright_8bit(img, bits)
        raw = None if changed else data
    ext = opts.get("format") or src_ext or "png"
    w, h = img.size
    if opts.get("resize"):
        img = resize_crop(img, opts["resize"])
    if raw is None or opts.get("resize") or ext != src_ext:  # else the source bytes go in unchanged
        if img.mode not in ("RGB", "L", "RGBA"):
            img = img.convert("RGB")
        raw = encode_image(img, ext)
    meta = {"source": src, "width": w, "height": h}
    if bits == 16:
        meta["source_bits"] = 16  # stored as 8-bit: counted in the manifest's converted_16bit
    return [_sample(key, ext, raw, label, meta)]


def encode_video_item(key, src, data, label, opts):
    """One sample per clip of opts['clip_frames'] frames (every frame_stride-th), or the whole video.
    Frames stream from the decoder at the shard's size, clip by clip: the source is never held whole."""
    stride = max(1, opts.get("frame_stride") or 1)
    n, size = opts.get("clip_frames"), opts.get("resize") or None  # 0: the source's size (swscale refuses 0)
    if isinstance(data, np.ndarray):
        fps, (h, w), reader = 8.0, data.shape[1:3], None
        frames = (np.asarray(resize_crop(Image.fromarray(f), size)) if size else f for f in data[::stride])
    else:
        reader = VideoReader(data)
        fps, total = reader.fps, reader.stream.frames
        clips = -(-total // stride) // n if n and total else 0  # known length: stop after the last clip
        frames = reader.frames(0, (clips * n - 1) * stride + 1 if clips else None, stride, size)
    out, clip, count = [], [], 0
    try:
        for f in frames:
            clip.append(f)
            count += 1
            if n and len(clip) == n:  # a clip is encoded as soon as its last frame is decoded
                out.append(_clip_sample(key, src, label, opts, clip, len(out), reader or (w, h), fps, stride))
                clip = []
        if not n and clip:
            out.append(_clip_sample(key, src, label, opts, clip, 0, reader or (w, h), fps, stride))
    finally:
        if reader is not None:
            reader.close()
    if not out:
        raise ValueError(f"video has {count} frames after stride {stride}, fewer than a clip of {n or count}")
    return out


def _clip_sample(key, src, label, opts, clip, c, source, fps, stride):
    w, h = (source.width, source.height) if isinstance(source, VideoReader) else source
    n = len(clip)
    clip = np.stack(clip)
    clip = clip[:, : clip.shape[1] // 2 * 2, : clip.shape[2] // 2 * 2]  # H.264 wants even sizes
    meta = {"source": src, "width": w, "height": h, "fps": fps / stride, "frames": n, "clip": c,
            "start_frame": c * n * stride, "frame_stride": stride}
    return _sample(f"{key}_{c:04d}" if opts.get("clip_frames") else key, "mp4",
                   encode_mp4(clip, fps=max(1, round(fps / stride))), label, meta)


def _sample(key, ext, data, label, meta):
    s = {"__key__": key, ext: data, "json": json.dumps(meta, sort_keys=True).encode()}
    if label is not None:
        s["cls"] = str(label).encode()
    return s


def _work(args):
    """(index, samples or None, error or None); never raises, so one bad file cannot stop the job."""
    index, src, data, label, opts = args
    key = f"{index:08d}"
    if isinstance(data, Skip):
        return index, None, str(data)
    try:
        if data is None:
            data = _read(src)
        enc = encode_video_item if opts["kind"] == "video" else encode_image_item
        return index, enc(key, src, data, label, opts), None
    except Exception as e:  # noqa: BLE001 - any unreadable input is skipped and reported
        return index, None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


# --------------------------------------------------------------------------------------------
# Writing


def _json_read(url):
    try:
        return read_json(url)
    except FileNotFoundError:
        return None


def fingerprint(items) -> dict:
    """{"inputs": count, "sha256": ...} of the item list (sources and labels in order): what a re-run
    compares to tell an unchanged source from one with files added, removed or relabelled."""
    h = hashlib.sha256()
    for src, data, label in items:
        h.update(f"{src}\t{'' if isinstance(data, Skip) or label is None else label}\n".encode())
    return {"inputs": len(items), "sha256": h.hexdigest()}


def _inputs_text(items) -> bytes:
    lines = "".join(f"{src}\n" for src, _, _ in items).encode()
    return gzip.compress(lines, mtime=0)


def _read_inputs(url) -> list | None:
    try:
        fs, path = fs_path(url)
        with fs.open(path, "rb") as f:
            return gzip.decompress(f.read()).decode().splitlines()
    except (FileNotFoundError, OSError, EOFError):
        return None


def _changed(then: dict, items, fp: dict, out: str, prefix: str) -> str:
    """'' when the manifest/progress `then` was written from the same item list, else why not (one line)."""
    if "sha256" not in then:  # written before the listing was recorded: the count is all there is
        n = then.get("inputs")
        return "" if n is None or n == fp["inputs"] else f"{fp['inputs']} inputs now, {n} then"
    if then["sha256"] == fp["sha256"]:
        return ""
    old = _read_inputs(join(out, f"{prefix}-inputs.txt.gz"))
    if old is None:
        return f"{fp['inputs']} inputs now, {then.get('inputs', '?')} then"
    now = {src for src, _, _ in items}
    new, gone = len(now - set(old)), len(set(old) - now)
    if not new and not gone:
        return "the same files with other labels or in another order"
    return f"{new} new, {gone} gone ({fp['inputs']} inputs now, {len(old)} then)"


def part_names(prefix: str, part) -> tuple[str, str, str]:
    """(shard name stem, finished-record name, progress name) of the whole job or of part (i, n)."""
    if part is None:
        return prefix, f"{prefix}-manifest.json", f"{prefix}-progress.json"
    i, n = part
    stem = f"{prefix}-p{i:04d}of{n:04d}"
    return stem, f"{stem}.json", f"{stem}-progress.json"


def make_shards(items, out: str, opts: dict, classes=(), prefix="data", workers=1, progress=True,
                part=None) -> dict:
    """Encode items [(src, data or None or Skip, label)] into shards under `out`; returns the manifest.

    part=(i, n): write only the i-th of n slices of items (keys stay global), as part i's shards and
    record; the last part to finish joins all into PREFIX-manifest.json (see join()).
    """
    return _make(items, out, opts, classes, prefix, workers, progress, part)[0]


def _make(items, out, opts, classes, prefix, workers, progress, part):
    """(manifest, what happened: "wrote" | "done before" | "part"), see make_shards."""
    from tqdm import tqdm

    fs, root = fs_path(out)
    fs.makedirs(root, exist_ok=True)
    fp = fingerprint(items)
    man_path = join(out, f"{prefix}-manifest.json")
    stem, rec_name, prog_name = part_names(prefix, part)
    rec_path, prog_path = join(out, rec_name), join(out, prog_name)
    for path in dict.fromkeys((man_path, rec_path)):  # the joined dataset, then this part's record
        done = _json_read(path)
        if done is None:
            continue
        if done.get("options") != opts:
            raise ShardError(f"{out} already holds {prefix}-* shards written with other options: "
                             f"use another folder or --prefix")
        why = _changed(done, items, fp, out, prefix)
        if why:
            raise ShardError(f"the source changed since the {prefix}-* shards in {out} were written: {why}; "
                             f"nothing was written: shard into another folder (or --prefix), or delete "
                             f"{prefix}-* in {out} and run again")
        if path == man_path:
            return done, "done before"
        joined = _try_join(out, prefix, part[1])
        return (joined or done), "done before"
    prog = _json_read(prog_path) or {}
    if prog and prog.get("options") != opts:
        raise ShardError(f"{out} holds an unfinished {prefix}-* job with other options: "
                         f"delete {prefix}-* there or use another folder/--prefix")
    why = _changed(prog, items, fp, out, prefix) if prog else ""
    if why:
        raise ShardError(f"{out} holds an unfinished {prefix}-* job over another listing of the source ({why}): "
                         f"delete {prefix}-* there and run again, or use another folder/--prefix")
    inputs_url = join(out, f"{prefix}-inputs.txt.gz")
    if (part is None or part[0] == 0) and not prog:  # a fresh start: the listing this job writes
        write_bytes(inputs_url, _inputs_text(items))  # key k <- line k; what a re-run compares to
    lo, hi = (0, len(items)) if part is None else (part[0] * len(items) // part[1],
                                                    (part[0] + 1) * len(items) // part[1])
    shards, errors, next_item = [], [], lo
    for s in prog.get("shards", []):  # keep the finished shards that are really there
        if not fs.exists(f"{root}/{s['name']}"):
            break
        shards.append(s)
        next_item = s["end_item"]
    errors = [e for e in prog.get("errors", []) if e["item"] < next_item]

    size, max_bytes = opts["shard_size"], opts.get("shard_bytes") or 0
    todo = [(i, items[i][0], items[i][1], items[i][2], opts) for i in range(next_item, hi)]
    bar = tqdm(total=hi - lo, initial=next_item - lo, unit="file", disable=not progress, file=sys.stderr)
    pending, nbytes, n16 = [], 0, 0

    def flush(end_item):
        nonlocal pending, nbytes, n16
        name = f"{stem}-{len(shards):06d}.tar"
        data = tar_bytes(pending)
        write_shard(join(out, name), data)  # its index, then the tar (atomic): a shard exists when its tar does
        shards.append({"name": name, "samples": len(pending), "bytes": len(data), "converted_16bit": n16,
                       "first_item": shards[-1]["end_item"] if shards else lo, "end_item": end_item})
        write_json(prog_path, {"options": opts, **fp, "shards": shards, "errors": errors})
        pending, nbytes, n16 = [], 0, 0

    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    pool = ctx.Pool(workers) if workers > 1 and todo else None
    try:
        results = pool.imap(_work, todo, chunksize=4) if pool else map(_work, todo)
        for index, samples, err in results:
            bar.update(1)
            if err:
                errors.append({"item": index, "source": todo[index - next_item][1], "error": err})
            else:
                pending.extend(samples)
                nbytes += sum(len(v) for s in samples for k, v in s.items() if k != "__key__")
                n16 += sum(b'"source_bits": 16' in s.get("json", b"") for s in samples)
            if len(pending) >= size or (max_bytes and nbytes >= max_bytes):
                flush(index + 1)
        if pending:
            flush(hi)
    finally:
        bar.close()
        if pool:
            pool.terminate()
    if not shards and part is None:  # an empty manifest would read as a finished, valid dataset
        # (a part may be empty: the join says so if all are)
        first = f" (first error: {errors[0]['source']}: {errors[0]['error']})" if errors else ""
        raise ShardError(f"none of the {len(items)} inputs could be read{first}")
    converted = sum(s.get("converted_16bit", 0) for s in shards)
    record = {
        "shards": [{"name": s["name"], "samples": s["samples"], "bytes": s["bytes"]} for s in shards],
        "total": sum(s["samples"] for s in shards), "classes": list(classes), "kind": opts["kind"],
        "options": opts, "errors": [{"source": e["source"], "error": e["error"]} for e in errors],
        "skipped": len(errors), **fp, "inputs": hi - lo, "converted_16bit": converted,
    }
    if part is not None:
        record.update(part=list(part), first_item=lo, end_item=hi)
    write_json(rec_path, record)
    fs.rm(fs_path(prog_path)[1])
    if part is None:
        return record, "wrote"
    joined = _try_join(out, prefix, part[1])
    return (joined or record), "part"


def _try_join(out, prefix, n):
    """The joined manifest once every part of n is finished (this process writes it), else None."""
    fs, root = fs_path(out)
    missing = [i for i in range(n) if not fs.exists(f"{root}/{part_names(prefix, (i, n))[1]}")]
    return None if missing else join_parts(out, prefix, n)


def join_parts(out: str, prefix: str = "data", n: int | None = None) -> dict:
    """Write PREFIX-manifest.json over the n finished parts in `out` (n: found from the part records)
    after checking that they agree: the same options, source listing and class map. Idempotent: the
    parts that finish together may both join, writing the same bytes."""
    fs, root = fs_path(out)
    pat = re.compile(re.escape(prefix) + r"-p(\d{4})of(\d{4})(-progress)?\.json$")
    found = {}
    for p in fs.ls(root, detail=False):
        m = pat.fullmatch(p.rstrip("/").rsplit("/", 1)[-1])
        if m:
            found.setdefault(int(m.group(2)), {}).setdefault(int(m.group(1)), []).append(bool(m.group(3)))
    if n is None:
        if not found:
            done = _json_read(join(out, f"{prefix}-manifest.json"))
            if done is not None:
                return done
            raise ShardError(f"no {prefix}-pIIIIofNNNN part records in {out}: write the parts with --part I/N first")
        if len(found) > 1:
            raise ShardError(f"{out} holds parts of {' and of '.join(map(str, sorted(found)))} parts: "
                             f"delete the ones you do not want")
        n = next(iter(found))
    parts = []
    for i in range(n):
        rec = _json_read(join(out, part_names(prefix, (i, n))[1]))
        parts.append(rec)
    missing = [str(i) for i, r in enumerate(parts) if r is None]
    if missing:
        raise ShardError(f"parts {', '.join(missing)} of {n} in {out} are not finished: run them "
                         f"(--part {missing[0]}/{n} ...; a part resumes where it stopped), then --join")
    first = parts[0]
    for i, r in enumerate(parts[1:], 1):
        for key, what in (("options", "options"), ("sha256", "source listing"), ("classes", "class map")):
            if r.get(key) != first.get(key):
                raise ShardError(f"part {i} of {n} in {out} was written with another {what} than part 0: "
                                 f"delete {prefix}-p{i:04d}of{n:04d}* there and write it again with the same "
                                 f"SOURCE and options")
    man = {
        "shards": [s for r in parts for s in r["shards"]],
        "total": sum(r["total"] for r in parts), "classes": first["classes"], "kind": first["kind"],
        "options": first["options"], "errors": [e for r in parts for e in r["errors"]],
        "skipped": sum(r["skipped"] for r in parts), "inputs": sum(r["inputs"] for r in parts),
        "sha256": first.get("sha256"), "parts": n,
        "converted_16bit": sum(r.get("converted_16bit", 0) for r in parts),
    }
    if not man["total"]:
        first_err = f" (first error: {man['errors'][0]['source']}: {man['errors'][0]['error']})" if man["errors"] else ""
        raise ShardError(f"none of the {man['inputs']} inputs could be read{first_err}")
    write_json(join(out, f"{prefix}-manifest.json"), man)
    return man


# --------------------------------------------------------------------------------------------
# CLI


def load_classes(url: str) -> list[str]:
    """A fixed class map: a manifest's "classes", a JSON list, or a text file of one name a line."""
    fs, path = fs_path(url)
    with fs.open(path, "r") as f:
        text = f.read()
    try:
        obj = json.loads(text)
    except ValueError:
        return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    names = obj.get("classes") if isinstance(obj, dict) else obj
    if not isinstance(names, list) or not names:
        raise ShardError(f"--classes {url}: expected a manifest with classes, a JSON list or one name a line")
    return [str(c) for c in names]


def build_items(args):
    """(items [(src, data, label)], classes, kind)."""
    if args.embedded:
        from data_tools import embedded

        if args.embedded == "digits":
            gen, kind = embedded.digits(args.split, size=args.resize or 16), "image"
        else:
            gen = embedded.moving_digits(args.split, frames=args.clip_frames or 16, size=args.resize or 16)
            kind = "video"
        return [(f"embedded:{args.embedded}/{name}", arr, label) for name, arr, label in gen], \
            embedded.CLASSES, kind
    if not args.source:
        raise ShardError("give a SOURCE folder or list file, or --embedded digits|moving_digits")
    src = args.source
    fs, path = fs_path(src)
    if src.lower().endswith(LIST_SUFFIXES) or (not src.lower().endswith(IMAGE_SUFFIXES + VIDEO_SUFFIXES + (".tar",))
                                               and fs.isfile(path)):
        kind, pairs, classes = list_file(src, args.kind, getattr(args, "delimiter", "auto"),
                                         getattr(args, "header", "auto"), getattr(args, "labels", "auto"))
    else:
        kind, pairs, classes = list_folder(src, args.kind)
    if getattr(args, "classes", None):
        fixed = load_classes(args.classes)
        unknown = sorted({n for _, n in pairs if n is not None and not isinstance(n, Skip)} - set(fixed))
        if unknown:
            raise ShardError(f"{len(unknown)} class(es) of {src} are not in --classes {args.classes} "
                             f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''})")
        classes = fixed
    index = {c: i for i, c in enumerate(classes)}
    return [(s, n, None) if isinstance(n, Skip) else (s, None, index[n] if n is not None else None)
            for s, n in pairs], classes, kind


def parse_part(text: str) -> tuple[int, int] | None:
    """(i, n) from "I/N" (0 <= I < N), or from the environment for "auto"; None for a whole job."""
    if text == "auto":
        env = os.environ
        if env.get("SLURM_ARRAY_TASK_ID") and env.get("SLURM_ARRAY_TASK_COUNT"):
            i = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
            n = int(env["SLURM_ARRAY_TASK_COUNT"])
        elif env.get("WORLD_SIZE") and env.get("RANK"):  # torchrun, submitit (launch.submit --service shard)
            i, n = int(env["RANK"]), int(env["WORLD_SIZE"])
        elif env.get("SLURM_NTASKS") and env.get("SLURM_PROCID"):
            i, n = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        else:
            i, n = 0, 1
    else:
        m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
        if not m:
            raise ShardError(f"--part {text!r}: write it as I/N, part I of N counted from 0 (e.g. --part 0/8), or auto")
        i, n = int(m.group(1)), int(m.group(2))
    if not 0 <= i < n:
        raise ShardError(f"--part {i}/{n}: I counts from 0 to N-1 (got {i} of {n})")
    return None if n == 1 else (i, n)


SHUFFLE_SEED = 0  # fixed: the same input gives the same shards


def shuffle_items(items: list, shuffle: bool) -> list:
    """The items in a fixed random order: a folder sorted by class would otherwise give one class
    per shard, and batches of a handful of classes at training time."""
    if not shuffle:
        return items
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(items))
    return [items[i] for i in order]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_tools.shard", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="[SOURCE] OUT", help="source folder or list file, and output URL")
    p.add_argument("--embedded", choices=("digits", "moving_digits"), help="write an embedded dataset")
    p.add_argument("--split", default="train", choices=("train", "heldout", "all"), help="embedded split")
    p.add_argument("--kind", default="auto", choices=("auto", "image", "video"))
    p.add_argument("--prefix", default="data", help="shard name prefix (PREFIX-000000.tar)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--shard-bytes", type=float, default=0, help="also close a shard past this many bytes")
    p.add_argument("--resize", type=int, default=0, help="resize the shorter side and centre-crop (pixels)")
    p.add_argument("--format", choices=("jpg", "png", "webp"), default=None,
                   help="re-encode images in this format (default: keep the source's; png for embedded)")
    p.add_argument("--clip-frames", type=int, default=0, help="video: frames per clip (0 = whole video)")
    p.add_argument("--frame-stride", type=int, default=1, help="video: keep every n-th frame")
    p.add_argument("--no-shuffle", action="store_true",
                   help="write the inputs in sorted order (default: shuffled with a fixed seed, so shards mix classes)")
    p.add_argument("--delimiter", default="auto", choices=("auto", "tab", "comma", "plain"),
                   help="list files: the column separator (auto: .csv comma, .tsv tab, else detected)")
    p.add_argument("--header", default="auto", choices=("auto", "yes", "no"),
                   help="list files: whether the first row names the columns (auto: detected)")
    p.add_argument("--labels", default="auto", choices=("auto", "index", "name"),
                   help="list files: auto = whole numbers are class indices as written, else class names")
    p.add_argument("--classes", default=None, metavar="FILE",
                   help="a fixed class map (a manifest, JSON list, or one name a line) instead of the source's")
    p.add_argument("--part", default=None, metavar="I/N",
                   help="write part I of N (from 0) of the dataset, for N machines at once; 'auto': from "
                        "RANK/WORLD_SIZE or SLURM; the last part to finish writes the joined manifest")
    p.add_argument("--join", action="store_true",
                   help="only join the finished parts in OUT into PREFIX-manifest.json (give OUT alone)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.embedded or args.join:
        if len(args.paths) != 1:
            p.error(f"with --{'embedded' if args.embedded else 'join'} give only OUT")
        args.source, out = None, args.paths[0]
    else:
        if len(args.paths) != 2:
            p.error("give SOURCE and OUT")
        args.source, out = args.paths
    if args.shard_size < 1:
        p.error("--shard-size must be at least 1")
    try:
        if args.join:
            man = join_parts(out, args.prefix)
            print(f"joined {man.get('parts', 1)} part(s): {man['total']} {man['kind']} samples from {man['inputs']} "
                  f"inputs in {len(man['shards'])} shards to {out} ({args.prefix}-manifest.json)")
            return 0
        part = parse_part(args.part) if args.part else None
        items, classes, kind = build_items(args)
        shuffle = not args.no_shuffle and not args.embedded  # embedded sets are generated mixed
        items = shuffle_items(items, shuffle)
        opts = {"kind": kind, "shard_size": args.shard_size, "shard_bytes": int(args.shard_bytes),
                "resize": args.resize, "format": args.format, "clip_frames": args.clip_frames,
                "frame_stride": args.frame_stride, "shuffle": shuffle,
                "source": f"embedded:{args.embedded}:{args.split}" if args.embedded else args.source}
        man, what = _make(items, out, opts, classes, args.prefix, max(1, args.workers), not args.quiet, part)
    except (ShardError, FileNotFoundError, PermissionError, StorageUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    skipped = f"; skipped {man['skipped']} input file(s), listed under 'errors' in the manifest" \
        if man["skipped"] else ""
    bits = f"; {man['converted_16bit']} 16-bit image(s) stored as 8-bit" if man.get("converted_16bit") else ""
    n = f"{man['total']} {kind} samples from {man['inputs']} inputs in {len(man['shards'])} shards"
    if what == "done before":
        which = part_names(args.prefix, tuple(man["part"]))[1] if "part" in man else f"{args.prefix}-manifest.json"
        print(f"nothing to do: {out} already holds {n} ({which}), written earlier "
              f"from the same source and options{skipped}{bits}")
    elif "part" in man:  # this part is written, others are not finished yet
        i, parts = man["part"]
        print(f"wrote part {i}/{parts}: {n} to {out} ({part_names(args.prefix, (i, parts))[1]}){skipped}{bits}; "
              f"the last part to finish joins all {parts} into {args.prefix}-manifest.json")
    else:
        joined = f" (joined {man['parts']} parts)" if man.get("parts") else ""
        print(f"wrote {n} to {out} ({args.prefix}-manifest.json){joined}{skipped}{bits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
