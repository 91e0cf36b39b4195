"""Video decoded at its target size (rin_scale.media.VideoReader): the right frames, at the right
size, without decoding the whole source; frames at their encoded size come out as a plain decode
gives them."""
import io

import numpy as np
import pytest

av = pytest.importorskip("av")

from rin_scale.media import VideoReader, decode_video, encode_mp4, read_video  # noqa: E402

N, KEYINT = 120, 24


def picture(i, h=48, w=64):
    """Frame i: its left half a flat grey for i // 12, its right half one for i % 12 (levels 20 apart)."""
    img = np.empty((h, w, 3), np.uint8)
    img[:, : w // 2], img[:, w // 2:] = 8 + 20 * (i // 12), 8 + 20 * (i % 12)
    return img


def index_of(frame):
    q = frame.shape[1] // 4
    hi, lo = (int(round((float(frame[:, cols].mean()) - 8) / 20)) for cols in (slice(0, q), slice(-q, None)))
    return hi * 12 + lo


@pytest.fixture(scope="module")
def numbered():
    """120 frames of 64x48, frame i a picture of i; H.264 with B-frames (non-reference
    ones included) and a keyframe every 24 frames, so clips seek and skip."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        st = out.add_stream("libx264", rate=30)
        st.width, st.height, st.pix_fmt = 64, 48, "yuv420p"
        st.options = {"crf": "10", "preset": "medium", "threads": "1",
                      "x264-params": f"keyint={KEYINT}:min-keyint={KEYINT}:scenecut=0:bframes=3:b-adapt=0:b-pyramid=normal"}
        for i in range(N):
            for p in st.encode(av.VideoFrame.from_ndarray(picture(i), format="rgb24")):
                out.mux(p)
        for p in st.encode():
            out.mux(p)
    return buf.getvalue()


def plain_decode(data):
    from av.video.reformatter import VideoReformatter

    rgb = VideoReformatter()
    with av.open(io.BytesIO(data)) as c:
        return [rgb.reformat(f, format="rgb24").to_ndarray() for f in c.decode(c.streams.video[0])]


def test_the_source_is_what_the_tests_need(numbered):
    with av.open(io.BytesIO(numbered)) as c:
        packets = [p for p in c.demux(c.streams.video[0]) if p.size]
    assert len(packets) == N and sum(p.is_keyframe for p in packets) == N // KEYINT
    assert [p.pts for p in packets] != sorted(p.pts for p in packets)  # B-frames: decode order differs
    assert [index_of(f) for f in plain_decode(numbered)] == list(range(N))


@pytest.mark.parametrize("start,count,stride", [(0, 8, 1), (5, 8, 2), (23, 4, 1), (24, 4, 3), (50, 16, 3),
                                                (97, 10, 2), (119, 1, 1), (30, 30, 3)])
@pytest.mark.parametrize("size", [None, 16, 40])
def test_a_clip_holds_the_frames_at_its_start_and_stride_at_its_size(numbered, start, count, stride, size):
    with VideoReader(numbered) as v:
        stop = start + (count - 1) * stride + 1
        clip = list(v.frames(start, stop, stride, size))
        assert [index_of(f) for f in clip] == list(range(start, stop, stride))
        shape = (48, 64, 3) if size is None else (size, size, 3)
        assert all(f.shape == shape and f.dtype == np.uint8 for f in clip)
        # decoding starts at the keyframe before the clip and stops after its last frame
        assert v.decoded <= stop - start // KEYINT * KEYINT


def test_kept_frames_are_the_bytes_a_full_decode_gives(numbered):
    """Seeking to the keyframe and telling the decoder to skip, packet by packet, the frames no other
    frame refers to changes no kept frame: every clip, from every start at strides 1-3, is byte for
    byte the full decode's frames at its positions. The source has B-frames that are references
    (B-pyramid) and ones that are not, so a wrong skip would show in the frames that refer to them."""
    ref = plain_decode(numbered)
    for stride in (1, 2, 3):
        for start in range(N):
            want = range(start, min(N, start + 7 * stride + 1), stride)
            with VideoReader(numbered) as v:
                got = list(v.frames(start, want.stop, stride))
            assert len(got) == len(want), (start, stride)
            assert all(np.array_equal(f, ref[i]) for f, i in zip(got, want)), (start, stride)


@pytest.mark.parametrize("codec,fmt,options", [
    ("libx265", "mp4", {"x265-params": "keyint=24:temporal-layers=3:b-pyramid=1:log-level=error:pools=none:frame-threads=1"}),
    ("libvpx-vp9", "webm", {"g": "24", "lag-in-frames": "16", "auto-alt-ref": "1"}),
])
def test_kept_frames_are_exact_in_other_codecs(codec, fmt, options):
    """Each decoder decides for itself what a frame nothing refers to is (HEVC: sub-layer
    non-reference pictures, here with temporal layers; FFmpeg's VP9 decoder skips none, and its
    clips seek through a WebM's cues): kept frames stay a full decode's bytes."""
    try:
        av.codec.Codec(codec, "w")
    except Exception:
        pytest.skip(f"this PyAV has no {codec} encoder")
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        st = out.add_stream(codec, rate=30)
        st.width, st.height, st.pix_fmt, st.options = 64, 48, "yuv420p", options
        for i in range(96):
            img = picture(i)
            img[(3 * i) % 48], img[:, (5 * i) % 64, 1] = 250, 0  # motion, so frames are predicted
            for p in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in st.encode():
            out.mux(p)
    data = buf.getvalue()
    ref = plain_decode(data)
    assert len(ref) == 96
    for stride in (1, 2, 3):
        for start in range(0, 96, 5):
            want = range(start, min(96, start + 7 * stride + 1), stride)
            with VideoReader(data) as v:
                got = list(v.frames(start, want.stop, stride))
            assert len(got) == len(want) and all(np.array_equal(f, ref[i]) for f, i in zip(got, want)), (start, stride)


def test_frames_nothing_refers_to_are_skipped_unless_kept(numbered):
    """The decoder honours the skip as it is switched between packets: a strided read decodes the
    reference frames and the kept ones, and not one frame more."""
    with av.open(io.BytesIO(numbered)) as c:
        pts = sorted(p.pts for p in c.demux(c.streams.video[0]) if p.size)
    with av.open(io.BytesIO(numbered)) as c:
        c.streams.video[0].codec_context.skip_frame = "NONREF"
        refs = {pts.index(f.pts) for f in c.decode(c.streams.video[0])}
    for stride in (2, 3):
        kept = set(range(0, N, stride))
        assert len(set(range(N)) - refs - kept) >= N // 4  # enough frames to skip for this to test it
        with VideoReader(numbered) as v:
            assert len(list(v.frames(0, None, stride))) == len(kept)
        assert v.decoded == len(refs | kept)


def test_a_clip_late_in_a_long_source_does_not_decode_it_whole(numbered):
    with VideoReader(numbered) as v:
        clip = list(v.frames(100, 108, 2, 16))
    assert [index_of(f) for f in clip] == [100, 102, 104, 106] and v.decoded <= 108 - 96
    with VideoReader(numbered) as v:  # from the first keyframe: frames after the clip are not decoded
        assert len(list(v.frames(3, 10, 3))) == 3 and v.decoded <= 10


def test_read_video_picks_a_random_strided_clip_that_fits(numbered):
    for seed in range(5):
        clip, fps = read_video(numbered, 6, np.random.default_rng(seed), stride=4, size=32)
        first = index_of(clip[0])
        assert fps == 30 and [index_of(f) for f in clip] == list(range(first, first + 24, 4))
        assert first + 20 < N and clip[0].shape == (32, 32, 3)
    assert [index_of(f) for f in read_video(numbered)[0]] == list(range(N))


def test_decode_video_shape_and_padding(numbered):
    x = decode_video(numbered, 8, 16, 3, np.random.default_rng(0))
    assert x.shape == (3, 8, 16, 16)
    idx = [index_of(x[:, t].permute(1, 2, 0).numpy()) for t in range(8)]
    assert idx == list(range(idx[0], idx[0] + 8))
    short = encode_mp4(np.full((3, 16, 16, 3), 100, np.uint8))
    y = decode_video(short, 5, 16, 1)
    assert y.shape == (1, 5, 16, 16) and (y[:, 3] == y[:, 2]).all()  # the last frame repeats


def test_clips_at_their_encoded_size_decode_as_a_plain_decode_does():
    """The small-clip path (no scaling, one reformatter): byte for byte what decoding every frame gives."""
    from data_tools.embedded import moving_digits

    for _, clip, _ in list(moving_digits("heldout", frames=16))[:6]:
        data = encode_mp4(clip)
        ref = plain_decode(data)
        got, _ = read_video(data)
        assert len(got) == len(ref) and all(np.array_equal(a, b) for a, b in zip(got, ref))
        for seed in range(3):
            rng = np.random.default_rng(seed)
            start = int(np.random.default_rng(seed).integers(0, len(ref) - 8 + 1))
            x = decode_video(data, 8, 16, 3, rng)
            assert np.array_equal(x.permute(1, 2, 3, 0).numpy(), np.stack(ref[start:start + 8]))


def test_shard_tool_cuts_strided_clips_at_its_size_from_a_stream(numbered):
    from data_tools.shard import encode_video_item
    import json

    opts = {"kind": "video", "clip_frames": 5, "frame_stride": 3, "resize": 16}
    out = encode_video_item("k", "src.mp4", numbered, None, opts)
    assert len(out) == N // 3 // 5  # 40 strided frames: 8 whole clips
    for c, s in enumerate(out):
        meta = json.loads(s["json"])
        frames, _ = read_video(s["mp4"])
        assert meta["start_frame"] == c * 15 and (meta["width"], meta["height"]) == (64, 48)
        assert [index_of(f) for f in frames] == list(range(c * 15, c * 15 + 15, 3))
        assert frames[0].shape == (16, 16, 3)
    with pytest.raises(ValueError, match="40 frames after stride 3, fewer than a clip of 41"):
        encode_video_item("k", "src.mp4", numbered, None, {**opts, "clip_frames": 41})
