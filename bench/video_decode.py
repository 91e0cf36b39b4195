"""Video decoded at its target size: the old read_video (every frame of the source at full
resolution, then PIL) against rin_scale.media.VideoReader (seek, stride, swscale to the clip's size),
per clip, with each path's peak resident memory measured in a process of its own.

    python bench/video_decode.py [--size 1280x720] [--seconds 10] [--frames 16] [--stride 2] [--res 64]

The source is ffmpeg's testsrc2 encoded by PyAV's libx264 with ffmpeg's defaults (preset medium,
crf 23, keyframe every 250 frames), like `ffmpeg -f lavfi -i testsrc2=size=1280x720:rate=30 -t 10
-pix_fmt yuv420p src.mp4`. Two ways to use a source:
  one clip    a clip of FRAMES frames every STRIDE-th from a random start, at RES x RES (a loader
              reading source videos: decode_video; seeded starts, the same for both paths)
  all clips   every whole clip of the source, as the shard tool cuts them (per clip = per source / clips)
Timings are the median of --repeats, one decoder thread (one worker); the mp4 encoding of shard
clips is left out (the same for both paths). Peak RSS is ru_maxrss of the child that ran the path,
imports included (numpy, PIL, av; not torch, which rin_scale.media no longer imports at load).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rin_scale.media import VideoReader, resize_crop  # noqa: E402


# --------------------------------------------------------------------------------------------
# The old path, as rin_scale.media.read_video was before decoding at the target size (1abd065)


def old_read_video(data: bytes, frames: int = 0, rng=None) -> tuple[list[np.ndarray], float]:
    import av
    from av.video.reformatter import VideoReformatter

    rgb = VideoReformatter()
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 8)
        n = stream.frames
        start = int(rng.integers(0, n - frames + 1)) if frames and rng is not None and n > frames else 0
        decoded = []
        for i, f in enumerate(container.decode(stream)):
            if i >= start:
                decoded.append(rgb.reformat(f, format="rgb24").to_ndarray())
            if frames and n and len(decoded) == frames:
                break
    if not decoded:
        raise ValueError("video has no frames")
    if frames and not n and rng is not None and len(decoded) > frames:
        start = int(rng.integers(0, len(decoded) - frames + 1))
        decoded = decoded[start:]
    return (decoded[:frames] if frames else decoded), fps


def old_clip(data, start, frames, stride, res):
    """One clip as the old code made it: the whole source decoded, then strided, then PIL."""
    src, _ = old_read_video(data)
    clip = src[start:start + (frames - 1) * stride + 1:stride]
    return np.stack([np.asarray(resize_crop(Image.fromarray(f), res)) for f in clip])


def old_all_clips(data, frames, stride, res):
    """Every clip of a source, as the old shard tool (encode_video_item) cut them."""
    src, _ = old_read_video(data)
    src = src[::stride]
    return [np.stack([np.asarray(resize_crop(Image.fromarray(f), res)) for f in src[s:s + frames]])
            for s in range(0, len(src) - frames + 1, frames)]


# --------------------------------------------------------------------------------------------
# The new path


def new_clip(data, start, frames, stride, res):
    with VideoReader(data) as v:
        return np.stack(list(v.frames(start, start + (frames - 1) * stride + 1, stride, res)))


def new_all_clips(data, frames, stride, res):
    out, clip = [], []
    with VideoReader(data) as v:
        for f in v.frames(0, None, stride, res):
            clip.append(f)
            if len(clip) == frames:
                out.append(np.stack(clip))
                clip = []
    return out


PATHS = {"old one clip": old_clip, "new one clip": new_clip,
         "old all clips": old_all_clips, "new all clips": new_all_clips}


# --------------------------------------------------------------------------------------------


def make_source(path, w, h, fps, seconds):
    import av

    if os.path.exists(path):
        return
    graph = av.filter.Graph()
    src = graph.add("testsrc2", f"size={w}x{h}:rate={fps}:duration={seconds}")
    fmt, sink = graph.add("format", "yuv420p"), graph.add("buffersink")
    src.link_to(fmt)
    fmt.link_to(sink)
    graph.configure()
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        st = out.add_stream("libx264", rate=fps)
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        st.options = {"preset": "medium", "crf": "23"}  # ffmpeg's defaults for libx264
        while True:
            try:
                f = sink.pull()
            except (av.error.EOFError, av.error.BlockingIOError):
                break
            f.pts, f.pict_type = None, av.video.frame.PictureType.NONE  # no forced keyframes
            for p in st.encode(f):
                out.mux(p)
        for p in st.encode():
            out.mux(p)
    with open(path + ".part", "wb") as fh:
        fh.write(buf.getvalue())
    os.replace(path + ".part", path)


def child(args):
    """Run one path --repeats times in this process; print times, outputs' digest and peak RSS."""
    data = open(args.src, "rb").read()
    fn = PATHS[args.child]
    with VideoReader(data) as v:
        n, keys = v.count, len(v._index()[1])
    span = (args.frames - 1) * args.stride + 1
    starts = np.random.default_rng(0).integers(0, n - span + 1, args.repeats)
    times, out = [], None
    for r in range(args.repeats):
        t = time.perf_counter()
        if "one" in args.child:
            out = fn(data, int(starts[r]), args.frames, args.stride, args.res)
            clips = 1
        else:
            out = fn(data, args.frames, args.stride, args.res)
            clips = len(out)
        times.append((time.perf_counter() - t) / clips)
    np.save(args.out, np.stack(out) if isinstance(out, list) else out[None])
    print(json.dumps({"s_per_clip": float(np.median(times)), "clips": clips, "frames": n, "keyframes": keys,
                      "start": int(starts[-1]), "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_child(args, src, path, repeats, tmp):
    out = os.path.join(tmp, path.replace(" ", "_") + ".npy")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", path, "--src", src, "--out", out,
           "--frames", str(args.frames), "--stride", str(args.stride), "--res", str(args.res), "--repeats", str(repeats)]
    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    r["arr"] = np.load(out)
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1280x720", help="source WxH")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hd", action="store_true", help="also time the new path on a 1920x1080 source (the estimate's upper end)")
    p.add_argument("--tmp", default="/tmp/rin_video_decode")
    p.add_argument("--child"), p.add_argument("--src"), p.add_argument("--out")
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    os.makedirs(args.tmp, exist_ok=True)
    w, h = map(int, args.size.split("x"))
    src = os.path.join(args.tmp, f"testsrc2_{w}x{h}_{args.fps}fps_{args.seconds:g}s.mp4")
    make_source(src, w, h, args.fps, args.seconds)
    res = {path: run_child(args, src, path, args.repeats if "one" in path else max(1, args.repeats - 1), args.tmp)
           for path in PATHS}
    info = res["new one clip"]
    print(f"source: testsrc2 {w}x{h} {args.fps} fps {args.seconds:g} s, libx264 medium crf 23, "
          f"{info['frames']} frames, {info['keyframes']} keyframes, {os.path.getsize(src) / 1e6:.1f} MB")
    print(f"clip: {args.frames} frames every {args.stride}, {args.res}x{args.res}; one decoder thread; "
          f"median of {args.repeats} (one clip) / {max(1, args.repeats - 1)} (all clips)\n")
    print(f"{'path':<16}{'ms per clip':>12}{'clips':>7}{'peak RSS MB':>13}{'speed-up':>10}")
    for path, r in res.items():
        base = res[path.replace("new", "old")]["s_per_clip"]
        sp = f"{base / r['s_per_clip']:.1f}x" if path.startswith("new") else ""
        print(f"{path:<16}{r['s_per_clip'] * 1e3:>12.1f}{r['clips']:>7}{r['maxrss_mb']:>13.0f}{sp:>10}")
    # the decoder's scaler against PIL on the same frames (the last repeat's clips)
    for kind in ("one clip", "all clips"):
        a, b = res["old " + kind]["arr"].astype(np.int16), res["new " + kind]["arr"].astype(np.int16)
        if a.shape == b.shape:
            print(f"\nswscale vs PIL ({kind}, {a.shape[0] * a.shape[1]} frames): mean abs diff "
                  f"{np.abs(a - b).mean():.2f} of 255, 99th percentile {np.percentile(np.abs(a - b), 99):.0f}")
    # Kinetics-600: ~500k source videos of 10 s at 720p-1080p, ~400k training clips
    per_src = {k: res[f"{k} all clips"]["s_per_clip"] * res[f"{k} all clips"]["clips"] for k in ("old", "new")}
    scale_1080 = 1920 * 1080 / (w * h)
    hd = None
    if args.hd:
        src_hd = os.path.join(args.tmp, f"testsrc2_1920x1080_{args.fps}fps_{args.seconds:g}s.mp4")
        make_source(src_hd, 1920, 1080, args.fps, args.seconds)
        r = run_child(args, src_hd, "new all clips", max(1, args.repeats - 1), args.tmp)
        hd = r["s_per_clip"] * r["clips"]
        print(f"\nnew all clips at 1920x1080: {r['s_per_clip'] * 1e3:.1f} ms per clip, "
              f"{hd:.2f} s per source, peak RSS {r['maxrss_mb']:.0f} MB")
    print(f"\nKinetics-600 estimate (decode only, one worker; 1080p {'measured' if hd else 'scaled by pixels'}):")
    for k in ("old", "new"):
        lo = per_src[k]
        hi = hd if (k == "new" and hd) else lo * scale_1080
        print(f"  {k}: sharding 500k sources ({lo:.2f}-{hi:.2f} s each): "
              f"{500e3 * lo / 3600:,.0f}-{500e3 * hi / 3600:,.0f} h per worker; "
              f"400k random clips from sources ({res[f'{k} one clip']['s_per_clip'] * 1e3:.0f} ms at {w}x{h}): "
              f"{400e3 * res[f'{k} one clip']['s_per_clip'] / 3600:,.0f} h per worker per epoch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
