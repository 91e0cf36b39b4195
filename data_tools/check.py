"""Check shards against their manifest, print statistics, and write a preview.

    python -m data_tools.check URL [--json] [--preview grid.png] [--count 64]

URL: a shard folder, a manifest or a brace pattern (as data.shards). Every sample of every shard is
read and decoded; counts are compared with the manifest. Exit status 1 when anything is wrong. A
dataset written in parts (data_tools.shard --part I/N) is read through its joined manifest; a folder
of finished parts that were never joined is an error naming `data_tools.shard --join`.
Video previews are a GIF (or .mp4) strip: one row of clips, played frame by frame.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import re
import sys

import numpy as np
from PIL import Image

from rin_scale.media import IMAGE_EXTS, VIDEO_EXTS, encode_mp4, read_video
from rin_scale.shards import DataError, list_shards, read_tar_samples
from rin_scale.storage import StorageUnavailable, fs_path, write_bytes


def _decode(sample):
    """(kind, uint8 array HxWxC or TxHxWxC) of a raw sample; raises if undecodable."""
    for e in IMAGE_EXTS:
        if e in sample:
            img = Image.open(io.BytesIO(sample[e]))
            return "image", np.asarray(img.convert("RGB"))
    for e in VIDEO_EXTS:
        if e in sample:
            return "video", np.stack(read_video(sample[e])[0])
    raise ValueError(f"no media member in {sorted(k for k in sample if k != '__key__')}")


def _ends_cleanly(url: str) -> bool:
    """Whether a tar ends with its two zero end-of-archive blocks: cut at a 512-byte boundary, it
    otherwise reads as a shorter valid tar, and without a manifest no count gives it away."""
    fs, path = fs_path(url)
    tail = fs.cat_file(path, start=-1024)
    return len(tail) == 1024 and not tail.strip(b"\0")


def check(url: str, keep: int = 0) -> tuple[dict, list[np.ndarray]]:
    """(report of statistics and errors for the shards at url, the first `keep` decoded samples for a preview)."""
    shards, counts, man = list_shards(url)
    report = {"url": url, "shards": len(shards), "samples": 0, "expected": sum(counts), "errors": [],
              "classes": {}, "sizes": {}, "frames": {}, "bytes": 0, "kind": man.get("kind", "")}
    classes, sizes, frames = collections.Counter(), collections.Counter(), collections.Counter()
    kept, keys = [], set()
    names = man.get("classes") or []
    for shard, expected in zip(shards, counts):
        n = 0
        try:
            for _, s in read_tar_samples(shard):
                n += 1
                report["bytes"] += sum(len(v) for k, v in s.items() if k != "__key__")
                if s["__key__"] in keys:
                    report["errors"].append(f"{shard}: duplicate key {s['__key__']}")
                keys.add(s["__key__"])
                try:
                    kind, arr = _decode(s)
                except Exception as e:  # noqa: BLE001
                    report["errors"].append(f"{shard}: sample {s['__key__']} does not decode ({type(e).__name__})")
                    continue
                report["kind"] = report["kind"] or kind
                sizes[f"{arr.shape[-2]}x{arr.shape[-3]}"] += 1
                if kind == "video":
                    frames[str(arr.shape[0])] += 1
                if "cls" in s:
                    c = int(s["cls"])
                    classes[names[c] if c < len(names) else str(c)] += 1
                if len(kept) < keep:
                    kept.append(arr)
                report["samples"] += 1
        except FileNotFoundError:
            report["errors"].append(f"{shard}: missing")
            continue
        except Exception as e:  # noqa: BLE001 - truncated or corrupt tar
            report["errors"].append(f"{shard}: unreadable after {n} samples ({type(e).__name__}: {e})")
        else:
            if not _ends_cleanly(shard):
                report["errors"].append(f"{shard}: truncated after {n} samples (no end-of-archive blocks)")
        if n != expected:
            report["errors"].append(f"{shard}: {n} samples, manifest says {expected}")
    if not report["expected"]:  # a job whose every input failed used to leave such a manifest
        first = man.get("errors") or [{}]
        report["errors"].append(f"{url}: empty dataset, {len(shards)} shards hold no samples" + (
            f"; all {man.get('inputs', '?')} inputs were skipped when sharding "
            f"(first: {first[0].get('source')}: {first[0].get('error')})" if man.get("errors") else ""))
    if not man and not url.endswith((".json", ".tar")) and "{" not in url:
        fs, path = fs_path(url)  # parts written with --part I/N but never joined: no class map, no counts
        parts = [p for p in fs.ls(path, detail=False) if re.search(r"-p\d{4}of\d{4}\.json$", p)]
        if parts:
            report["errors"].append(f"{url}: {len(parts)} finished part(s) but no joined manifest: run "
                                    f"python -m data_tools.shard --join {url} (it names the parts not finished)")
    report["classes"], report["sizes"], report["frames"] = dict(classes), dict(sizes), dict(frames)
    report["skipped_at_write"] = man.get("skipped", 0)
    return report, kept


def _grid(images, cols):
    h = max(a.shape[0] for a in images)
    w = max(a.shape[1] for a in images)
    rows = (len(images) + cols - 1) // cols
    g = np.zeros((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), np.uint8)
    for i, a in enumerate(images):
        r, c = divmod(i, cols)
        g[2 + r * (h + 2):2 + r * (h + 2) + a.shape[0], 2 + c * (w + 2):2 + c * (w + 2) + a.shape[1]] = a
    return g


def write_preview(samples, path: str) -> None:
    """A grid PNG for images; for video a strip of clips as GIF (or MP4 when path ends in .mp4)."""
    buf = io.BytesIO()
    if samples[0].ndim == 3:
        scale = max(1, 64 // samples[0].shape[0])
        grid = Image.fromarray(_grid(samples, int(np.ceil(np.sqrt(len(samples))))))
        grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(buf, "PNG")
    else:
        t = min(a.shape[0] for a in samples)
        frames = [_grid([a[i] for a in samples], len(samples)) for i in range(t)]
        if path.endswith(".mp4"):
            frames = [f[: f.shape[0] // 2 * 2, : f.shape[1] // 2 * 2] for f in frames]
            buf.write(encode_mp4(np.stack(frames)))
        else:
            scale = max(1, 64 // samples[0].shape[1])
            ims = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames]
            ims[0].save(buf, "GIF", save_all=True, append_images=ims[1:], duration=125, loop=0)
    write_bytes(path, buf.getvalue())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.check", description=__doc__.split("\n\n")[0])
    p.add_argument("url", help="shard folder, manifest or brace pattern")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--preview", help="write a preview: grid .png for images, .gif or .mp4 strip for video")
    p.add_argument("--count", type=int, default=0, help="samples in the preview (default 64 images, 8 clips)")
    args = p.parse_args(argv)
    try:
        report, kept = check(args.url, keep=args.count or 64 if args.preview else 0)
    except (DataError, StorageUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.preview and kept:
        if kept[0].ndim == 4:
            kept = kept[: args.count or 8]
        write_preview(kept, args.preview)
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        print(f"{report['url']}: {report['samples']} of {report['expected']} samples decoded in "
              f"{report['shards']} shards, {report['bytes'] / 1e6:.1f} MB, kind {report['kind'] or '?'}")
        print(f"  sizes: {report['sizes']}" + (f"  frames: {report['frames']}" if report["frames"] else ""))
        if report["classes"]:
            print(f"  classes ({len(report['classes'])}): {dict(sorted(report['classes'].items()))}")
        if report["skipped_at_write"]:
            print(f"  {report['skipped_at_write']} input file(s) were skipped when sharding (see the manifest)")
        for e in report["errors"][:20]:
            print(f"  ERROR {e}")
        if len(report["errors"]) > 20:
            print(f"  ... {len(report['errors']) - 20} more errors")
        print("OK" if not report["errors"] else f"{len(report['errors'])} error(s)")
        if args.preview and kept:
            print(f"preview: {args.preview}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
