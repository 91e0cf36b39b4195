"""Write WebDataset tar shards plus a manifest to any fsspec URL.

    python -m data_tools.shard SOURCE OUT [--prefix data] [--shard-size 1000] [--resize 256] ...
    python -m data_tools.shard --embedded digits --split train OUT

SOURCE: a folder of images (class subfolders become labels; a flat folder is unlabelled), a folder
of videos, or a text file listing files or URLs (one a line, optionally "<TAB>class").
OUT gets PREFIX-000000.tar, ... and PREFIX-manifest.json. Deterministic: the same input gives the
same bytes and keys. Items are shuffled with a fixed seed before writing (--no-shuffle keeps
sorted order), so that a folder sorted by class gives shards that each hold every class; for videos
the source list is shuffled (the clips of one video stay together in one shard). A shard appears
under its final name only when complete (rin_scale.storage's atomic writes); PREFIX-progress.json
records finished shards, so re-running after a crash carries on after the last complete shard.
Unreadable files are skipped and listed in the manifest; so are the few files without a class when
most have one (a stray README.jpg beside the class folders).
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys

import numpy as np
from PIL import Image, ImageOps

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


def list_file(url: str, kind: str = "auto"):
    fs, path = fs_path(url)
    with fs.open(path, "r") as f:
        lines = [ln.strip() for ln in f.read().splitlines()]
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    items = []
    for ln in lines:
        if not ln or ln.startswith("#"):
            continue
        src, _, label = ln.partition("\t")
        if "://" not in src and not src.startswith("/"):
            src = base + "/" + src
        items.append((src, label.strip() or None))
    if not items:
        raise ShardError(f"{url} lists no files")
    if kind == "auto":
        kind = "video" if all(s.lower().endswith(VIDEO_SUFFIXES) for s, _ in items) else "image"
    return (kind, *_labels(items, f"lines of {url}", "have a <TAB>class", "without a <TAB>class"))


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


def _upright_8bit(img: Image.Image) -> tuple[Image.Image, bool]:
    """(the image as a viewer shows it, in 8 bits; whether that differs from the stored pixels).

    Decoders (Pillow's included) ignore EXIF orientation, and convert() clips 16-bit grey to 255,
    which turns a 16-bit PNG all white.
    """
    changed = img.getexif().get(0x0112, 1) != 1  # the EXIF Orientation tag
    if changed:
        img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I"):  # "I;16", "I;16B", "I": 16-bit grey
        arr = np.asarray(img).astype(np.float64) * (255 / 65535)
        img, changed = Image.fromarray(np.round(arr).clip(0, 255).astype(np.uint8), "L"), True
    return img, changed


def encode_image_item(key, src, data, label, opts):
    """-> list of samples. `data`: raw bytes, or an HxWx3 uint8 array (embedded sets)."""
    if isinstance(data, np.ndarray):
        img, src_ext, raw = Image.fromarray(data), None, None
    else:
        img = Image.open(io.BytesIO(data))
        img.load()  # raises on truncated or corrupt files
        src_ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(img.format)
        img, changed = _upright_8bit(img)
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
    return [_sample(key, ext, raw, label, meta)]


def encode_video_item(key, src, data, label, opts):
    """One sample per clip of opts['clip_frames'] frames (every frame_stride-th), or the whole video.
    Frames stream from the decoder at the shard's size, clip by clip: the source is never held whole."""
    stride = max(1, opts.get("frame_stride") or 1)
    n, size = opts.get("clip_frames"), opts.get("resize")
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


def make_shards(items, out: str, opts: dict, classes=(), prefix="data", workers=1, progress=True) -> dict:
    """Encode items [(src, data or None or Skip, label)] into shards under `out`; returns the manifest."""
    from tqdm import tqdm

    fs, root = fs_path(out)
    fs.makedirs(root, exist_ok=True)
    man_path, prog_path = join(out, f"{prefix}-manifest.json"), join(out, f"{prefix}-progress.json")
    done = _json_read(man_path)
    if done is not None:
        if done.get("options") != opts:
            raise ShardError(f"{out} already holds {prefix}-* shards written with other options: "
                             f"use another folder or --prefix")
        return done
    prog = _json_read(prog_path) or {}
    if prog and prog.get("options") != opts:
        raise ShardError(f"{out} holds an unfinished {prefix}-* job with other options: "
                         f"delete {prefix}-* there or use another folder/--prefix")
    shards, errors, next_item = [], [], 0
    for s in prog.get("shards", []):  # keep the finished shards that are really there
        if not fs.exists(f"{root}/{s['name']}"):
            break
        shards.append(s)
        next_item = s["end_item"]
    errors = [e for e in prog.get("errors", []) if e["item"] < next_item]

    size, max_bytes = opts["shard_size"], opts.get("shard_bytes") or 0
    todo = [(i, src, data, label, opts) for i, (src, data, label) in enumerate(items) if i >= next_item]
    bar = tqdm(total=len(items), initial=next_item, unit="file", disable=not progress, file=sys.stderr)
    pending, nbytes = [], 0

    def flush(end_item):
        nonlocal pending, nbytes
        name = f"{prefix}-{len(shards):06d}.tar"
        data = tar_bytes(pending)
        write_bytes(join(out, name), data)  # atomic: the shard appears under its name only when complete
        shards.append({"name": name, "samples": len(pending), "bytes": len(data),
                       "first_item": shards[-1]["end_item"] if shards else 0, "end_item": end_item})
        write_json(prog_path, {"options": opts, "shards": shards, "errors": errors})
        pending, nbytes = [], 0

    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    pool = ctx.Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_work, todo, chunksize=4) if pool else map(_work, todo)
        for index, samples, err in results:
            bar.update(1)
            if err:
                errors.append({"item": index, "source": todo[index - next_item][1], "error": err})
            else:
                pending.extend(samples)
                nbytes += sum(len(v) for s in samples for k, v in s.items() if k != "__key__")
            if len(pending) >= size or (max_bytes and nbytes >= max_bytes):
                flush(index + 1)
        if pending:
            flush(len(items))
    finally:
        bar.close()
        if pool:
            pool.terminate()
    if not shards:  # an empty manifest would read as a finished, valid dataset
        first = f" (first error: {errors[0]['source']}: {errors[0]['error']})" if errors else ""
        raise ShardError(f"none of the {len(items)} inputs could be read{first}")
    manifest = {
        "shards": [{"name": s["name"], "samples": s["samples"], "bytes": s["bytes"]} for s in shards],
        "total": sum(s["samples"] for s in shards), "classes": list(classes), "kind": opts["kind"],
        "options": opts, "errors": [{"source": e["source"], "error": e["error"]} for e in errors],
        "skipped": len(errors), "inputs": len(items),
    }
    write_json(man_path, manifest)
    fs.rm(fs_path(prog_path)[1])
    return manifest


# --------------------------------------------------------------------------------------------
# CLI


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
    if src.lower().endswith((".txt", ".lst", ".list")):
        kind, pairs, classes = list_file(src, args.kind)
    else:
        kind, pairs, classes = list_folder(src, args.kind)
    index = {c: i for i, c in enumerate(classes)}
    return [(s, n, None) if isinstance(n, Skip) else (s, None, index[n] if n is not None else None)
            for s, n in pairs], classes, kind


SHUFFLE_SEED = 0  # fixed: the same input gives the same shards


def shuffle_items(items: list, shuffle: bool) -> list:
    """The items in a fixed random order: a folder sorted by class would otherwise give one class
    per shard, and batches of a handful of classes at training time."""
    if not shuffle:
        return items
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(items))
    return [items[i] for i in order]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.shard", description=__doc__.split("\n\n")[0])
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
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.embedded:
        if len(args.paths) != 1:
            p.error("with --embedded give only OUT")
        args.source, out = None, args.paths[0]
    else:
        if len(args.paths) != 2:
            p.error("give SOURCE and OUT")
        args.source, out = args.paths
    if args.shard_size < 1:
        p.error("--shard-size must be at least 1")
    try:
        items, classes, kind = build_items(args)
        shuffle = not args.no_shuffle and not args.embedded  # embedded sets are generated mixed
        items = shuffle_items(items, shuffle)
        opts = {"kind": kind, "shard_size": args.shard_size, "shard_bytes": int(args.shard_bytes),
                "resize": args.resize, "format": args.format, "clip_frames": args.clip_frames,
                "frame_stride": args.frame_stride, "shuffle": shuffle,
                "source": f"embedded:{args.embedded}:{args.split}" if args.embedded else args.source}
        man = make_shards(items, out, opts, classes, args.prefix, max(1, args.workers), not args.quiet)
    except (ShardError, FileNotFoundError, PermissionError, StorageUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    skipped = f"; skipped {man['skipped']} input file(s), listed under 'errors' in the manifest" \
        if man["skipped"] else ""
    print(f"wrote {man['total']} {kind} samples from {man['inputs']} inputs in {len(man['shards'])} shards "
          f"to {out} ({args.prefix}-manifest.json){skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
