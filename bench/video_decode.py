"""Video decoded at its target size: the old read_video (every frame of the source at full
resolution, then PIL) against rin_scale.media.VideoReader (seek, skip what nothing refers to, stride,
swscale to the clip's size), per clip, with each path's peak resident memory measured in a process
of its own.

    python bench/video_decode.py [--size 1280x720] [--seconds 10] [--gop 250] [--frames 16]
                                 [--stride 2] [--res 64] [--repeats 10] [--rounds 5] [--threads 2]

The source is ffmpeg's testsrc2 encoded by PyAV's libx264 with ffmpeg's defaults (preset medium,
crf 23, B-frames, a keyframe every 250 frames), like `ffmpeg -f lavfi -i testsrc2=size=1280x720:rate=30
-t 10 -pix_fmt yuv420p src.mp4`; --gop sets the keyframe interval (`-g`; YouTube-style sources have
one every 2-5 s, i.e. 50-150 frames at 30 fps). Two ways to use a source:
  one clip    a clip of FRAMES frames every STRIDE-th from a random start, at RES x RES (a loader
              reading source videos: decode_video); the mean over --repeats evenly spaced starts (the
              expected cost of a uniformly random one: a clip costs more the further it ends from
              its keyframe), the same starts for both paths
  all clips   every whole clip of the source, as the shard tool cuts them (per clip = per source / clips)
The paths take turns (--rounds), each a share of the starts or one all-clips run a turn, so that a
change in the machine's load falls on old and new alike.
Each path reports wall and CPU time per clip (CPU: time.process_time, all threads of the process)
and the frames the decoder produced per run (a clip, or the whole source for all clips: the same on
any machine, whatever its load), one decoder thread (one worker); with --threads N the new one-clip
path also runs with N frame threads, checked to give the same bytes. The mp4 encoding of shard clips is left out (the same for
both paths). Peak RSS is VmHWM of the child that ran the path, imports included (numpy, PIL,
av; not torch, which rin_scale.media does not import at load).
"""
from __future__ import annotations

import argparse
import io
import json
import os
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


DECODED = []  # frames the decoder produced, per run of a path


def old_clip(data, start, frames, stride, res):
    """One clip as the old code made it: the whole source decoded, then strided, then PIL."""
    src, _ = old_read_video(data)
    DECODED.append(len(src))
    clip = src[start:start + (frames - 1) * stride + 1:stride]
    return np.stack([np.asarray(resize_crop(Image.fromarray(f), res)) for f in clip])


def old_all_clips(data, frames, stride, res):
    """Every clip of a source, as the old shard tool (encode_video_item) cut them."""
    src, _ = old_read_video(data)
    DECODED.append(len(src))
    src = src[::stride]
    return [np.stack([np.asarray(resize_crop(Image.fromarray(f), res)) for f in src[s:s + frames]])
            for s in range(0, len(src) - frames + 1, frames)]


# --------------------------------------------------------------------------------------------
# The new path


def new_clip(data, start, frames, stride, res, threads=1):
    with VideoReader(data) as v:
        if threads > 1:  # frame threads: set before the first packet opens the decoder
            v.stream.thread_type, v.stream.thread_count = "FRAME", threads
        clip = np.stack(list(v.frames(start, start + (frames - 1) * stride + 1, stride, res)))
        DECODED.append(v.decoded)
    return clip


def new_all_clips(data, frames, stride, res):
    out, clip = [], []
    with VideoReader(data) as v:
        for f in v.frames(0, None, stride, res):
            clip.append(f)
            if len(clip) == frames:
                out.append(np.stack(clip))
                clip = []
        DECODED.append(v.decoded)
    return out


PATHS = {"old one clip": old_clip, "new one clip": new_clip,
         "old all clips": old_all_clips, "new all clips": new_all_clips}


# --------------------------------------------------------------------------------------------


def make_source(path, w, h, fps, seconds, gop):
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
        st.options = {"preset": "medium", "crf": "23", "g": str(gop)}  # ffmpeg's defaults for libx264 (g 250)
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
    """Run one path in this process, once per start in --starts (all clips: once); print the times
    per clip and the peak RSS, and save the last output."""
    data = open(args.src, "rb").read()
    path = args.child
    threads = int(path.split(", ")[1].split()[0]) if ", " in path else 1
    fn = PATHS[path.split(", ")[0]]
    wall, cpu, out, clips = [], [], None, 1
    for start in map(int, args.starts.split(",")) if "one" in path else [None]:
        t, c = time.perf_counter(), time.process_time()
        if start is not None:
            out = fn(data, start, args.frames, args.stride, args.res, *([threads] if threads > 1 else []))
        else:
            out = fn(data, args.frames, args.stride, args.res)
            clips = len(out)
        wall.append((time.perf_counter() - t) / clips)
        cpu.append((time.process_time() - c) / clips)
    np.save(args.out, np.stack(out) if isinstance(out, list) else out[None])
    print(json.dumps({"wall": wall, "cpu": cpu, "decoded": DECODED, "clips": clips, "maxrss_mb": peak_rss_mb()}))


def peak_rss_mb():
    """This process's peak resident memory since its exec (VmHWM). Not ru_maxrss: Linux carries that
    across exec, so a child would report its parent's size at the fork if that was larger."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def run_child(args, src, path, starts, tmp):
    out = os.path.join(tmp, path.replace(" ", "_").replace(",", "") + ".npy")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", path, "--src", src, "--out", out,
           "--frames", str(args.frames), "--stride", str(args.stride), "--res", str(args.res),
           "--starts", ",".join(map(str, starts))]
    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    r["arr"] = np.load(out)
    return r


def run_paths(args, src, paths):
    """Each path's mean wall and CPU time per clip and its peak RSS. The paths take turns, a few
    starts (or one all-clips run) each round, so a change in the machine's load falls on all alike.
    Starts are evenly spaced: their mean is the expected cost of a uniformly random start without
    the spread of a few random draws (a clip late in a long GOP costs several times an early one)."""
    with VideoReader(open(src, "rb").read()) as v:
        n, keys = v.count, len(v._index()[1])
    starts = np.linspace(0, n - (args.frames - 1) * args.stride - 1, args.repeats).round().astype(int)
    res = {path: {"wall": [], "cpu": [], "decoded": [], "maxrss_mb": 0} for path in paths}
    rounds = max(1, min(args.rounds, args.repeats))  # every round has a start
    for r in range(rounds):
        for path in paths:
            got = run_child(args, src, path, starts[r::rounds], args.tmp)
            acc = res[path]
            acc["wall"] += got["wall"]
            acc["cpu"] += got["cpu"]
            acc["decoded"] += got["decoded"]
            acc.update(clips=got["clips"], arr=got["arr"], maxrss_mb=max(acc["maxrss_mb"], got["maxrss_mb"]))
    for acc in res.values():
        acc["s_per_clip"], acc["cpu_per_clip"] = np.mean(acc["wall"]), np.mean(acc["cpu"])
    return res, n, keys


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1280x720", help="source WxH")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--gop", type=int, default=250, help="the source's keyframe interval (x264's default: 250)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10, help="evenly spaced starts per one-clip path")
    p.add_argument("--rounds", type=int, default=5, help="turns the paths take (all clips: one run each)")
    p.add_argument("--threads", type=int, default=1, help="also time the new one-clip path with N frame threads")
    p.add_argument("--hd", action="store_true", help="also time the new path on a 1920x1080 source (the estimate's upper end)")
    p.add_argument("--tmp", default="/tmp/rin_video_decode")
    p.add_argument("--child"), p.add_argument("--src"), p.add_argument("--out"), p.add_argument("--starts")
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    os.makedirs(args.tmp, exist_ok=True)
    w, h = map(int, args.size.split("x"))
    name = f"testsrc2_{{}}_{args.fps}fps_{args.seconds:g}s_g{args.gop}.mp4"
    src = os.path.join(args.tmp, name.format(f"{w}x{h}"))
    make_source(src, w, h, args.fps, args.seconds, args.gop)
    paths = list(PATHS) + ([f"new one clip, {args.threads} threads"] if args.threads > 1 else [])
    res, n, keys = run_paths(args, src, paths)
    print(f"source: testsrc2 {w}x{h} {args.fps} fps {args.seconds:g} s, libx264 medium crf 23 g {args.gop}, "
          f"{n} frames, {keys} keyframes, {os.path.getsize(src) / 1e6:.1f} MB")
    print(f"clip: {args.frames} frames every {args.stride}, {args.res}x{args.res}; one decoder thread unless "
          f"named; mean of {args.repeats} evenly spaced starts (one clip) / {args.rounds} runs (all clips), "
          f"the paths taking turns\n")
    print(f"{'path':<26}{'wall ms':>9}{'CPU ms':>9}{'clips':>7}{'decoded':>9}{'peak RSS MB':>13}"
          f"{'speed-up wall':>15}{'CPU':>7}")
    for path, r in res.items():
        base = res["old " + path.split(", ")[0][4:]]
        sp = (f"{base['s_per_clip'] / r['s_per_clip']:.1f}x", f"{base['cpu_per_clip'] / r['cpu_per_clip']:.1f}x") \
            if path.startswith("new") else ("", "")
        print(f"{path:<26}{r['s_per_clip'] * 1e3:>9.1f}{r['cpu_per_clip'] * 1e3:>9.1f}{r['clips']:>7}"
              f"{np.mean(r['decoded']):>9.1f}"
              f"{r['maxrss_mb']:>13.0f}{sp[0]:>15}{sp[1]:>7}")
    if args.threads > 1:
        same = np.array_equal(res["new one clip"]["arr"], res[paths[-1]]["arr"])
        print(f"\n{args.threads} frame threads give the same bytes as one: {same}")
        if not same:
            return 1
    # the decoder's scaler against PIL on the same frames (the last repeat's clips)
    for kind in ("one clip", "all clips"):
        a, b = res["old " + kind]["arr"].astype(np.int16), res["new " + kind]["arr"].astype(np.int16)
        if a.shape == b.shape:
            print(f"\nswscale vs PIL ({kind}, {a.shape[0] * a.shape[1]} frames): mean abs diff "
                  f"{np.abs(a - b).mean():.2f} of 255, 99th percentile {np.percentile(np.abs(a - b), 99):.0f}")
    # Kinetics-600: ~500k source videos of 10 s at 720p-1080p, ~400k training clips. CPU time: a
    # worker is one busy core, whatever else shares the machine.
    per_src = {k: res[f"{k} all clips"]["cpu_per_clip"] * res[f"{k} all clips"]["clips"] for k in ("old", "new")}
    scale_1080 = 1920 * 1080 / (w * h)
    hd = None
    if args.hd:
        src_hd = os.path.join(args.tmp, name.format("1920x1080"))
        make_source(src_hd, 1920, 1080, args.fps, args.seconds, args.gop)
        r = run_paths(args, src_hd, ["new all clips"])[0]["new all clips"]
        hd = r["cpu_per_clip"] * r["clips"]
        print(f"\nnew all clips at 1920x1080: {r['cpu_per_clip'] * 1e3:.1f} CPU ms per clip, "
              f"{hd:.2f} s per source, peak RSS {r['maxrss_mb']:.0f} MB")
    print(f"\nKinetics-600 estimate (decode only, CPU time of one worker; 1080p {'measured' if hd else 'scaled by pixels'}):")
    for k in ("old", "new"):
        lo = per_src[k]
        hi = hd if (k == "new" and hd) else lo * scale_1080
        one = res[f"{k} one clip"]["cpu_per_clip"]
        print(f"  {k}: sharding 500k sources ({lo:.2f}-{hi:.2f} s each): "
              f"{500e3 * lo / 3600:,.0f}-{500e3 * hi / 3600:,.0f} h per worker; "
              f"400k random clips from sources ({one * 1e3:.0f} ms at {w}x{h}): "
              f"{400e3 * one / 3600:,.0f} h per worker per epoch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
