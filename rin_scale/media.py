"""Pixels in and out: decoding, resizing and cropping images and video clips, encoding them, and
the conversions between uint8 pixels and the model's [-1, 1] floats. Used alike by the data
pipeline, the shard tool, the shard inspector, the sampler CLI and the eval service, so that a
picture is resized the same way when it is sharded and when it is trained on.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

# torch is imported where tensors are made: the shard tool's workers decode and encode without it
# (its import alone is ~500 MB of resident memory)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # sample members that hold an image
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")  # sample members that hold a video clip
RANDOM_CROP_SCALE = 1.25  # random crops: the shorter side is first resized to [1, 1.25] x size (as ADM)


def resize_crop(img: Image.Image, size: int, crop=None) -> Image.Image:
    """Resize the shorter side to size (bicubic) and crop a centred square along the longer one; or,
    with crop=(fx, fy, fs) in [0, 1), resize the shorter side to size * (1 + (RANDOM_CROP_SCALE - 1) fs)
    and crop at fractions (fx, fy), so square data sharded at the training size is cropped too.
    A square image already at `size` and centre-cropped is returned as it is."""
    w, h, x, y = _fit(*img.size, size, crop)
    if (w, h) != img.size:
        img = img.resize((w, h), Image.BICUBIC)
    if (w, h) == (size, size):
        return img
    return img.crop((x, y, x + size, y + size))


def _fit(w: int, h: int, size: int, crop=None) -> tuple[int, int, int, int]:
    """resize_crop's geometry: (width, height) the shorter side is resized to, and the crop's corner."""
    target = size if crop is None else round(size * (1 + (RANDOM_CROP_SCALE - 1) * crop[2]))
    s = target / min(w, h)
    if s != 1:
        w, h = max(target, round(w * s)), max(target, round(h * s))
    if crop is not None:
        return w, h, int(crop[0] * (w - size + 1)), int(crop[1] * (h - size + 1))
    return w, h, (w - size) // 2, (h - size) // 2


class VideoReader:
    """An encoded video opened for clips, decoded at the clip's size.

    `frames(start, stop, stride, size, crop)` yields RGB uint8 frames start, start + stride, ... < stop,
    one at a time: decoding starts at the last keyframe at or before `start` (a seek, when that is not
    the first frame), stops after the last frame the clip keeps, and only kept frames are converted,
    by swscale straight from the decoder's YUV to the size resize_crop would give (the shorter side to
    `size`, then the same crop). So a clip costs its own frames and a GOP at most, and memory holds
    one full-resolution frame, not the source. Frames already at the wanted size are converted
    without scaling, byte for byte as before. Frame i is the i-th frame in presentation order, as
    counting decoded frames from the start gives. One decoder thread (one worker, one core)."""

    def __init__(self, data: bytes):
        import av
        from av.video.reformatter import VideoReformatter

        self._data = data
        self._container = av.open(io.BytesIO(data))
        if not self._container.streams.video:
            self._container.close()
            raise ValueError("no video stream")
        self.stream = self._container.streams.video[0]
        self.stream.thread_count = 1
        self.fps = float(self.stream.average_rate or 8)
        self.width = self.height = None  # the source's, once a frame is decoded
        self.decoded = 0  # frames the decoder has produced (tests: a clip does not decode the source)
        # One reformatter for the clip: frame.to_ndarray(format="rgb24") builds a swscale context per
        # frame, which took 9 of the 10 ms that 8 frames of 16x16 cost (the same bytes either way).
        self._rgb = VideoReformatter()
        self._pts = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._container.close()

    def _index(self) -> tuple[list, list]:
        """(pts of each frame in presentation order, pts of keyframes) from the packets alone, no decoding."""
        if self._pts is None:
            import av

            pts, keys = [], []
            with av.open(io.BytesIO(self._data)) as c:
                for p in c.demux(c.streams.video[0]):
                    if p.pts is None or p.size == 0 or getattr(p, "is_discard", False):
                        continue
                    pts.append(p.pts)
                    if p.is_keyframe:
                        keys.append(p.pts)
            self._pts = (sorted(pts), sorted(keys))
        return self._pts

    @property
    def count(self) -> int:
        """The number of frames: the container's figure, or counted from the packets."""
        return self.stream.frames or len(self._index()[0])

    def random_start(self, frames: int, rng=None, stride: int = 1) -> int:
        """A clip's first frame: uniform over those a whole clip fits after (with rng), else 0."""
        span = (frames - 1) * stride + 1
        n = self.count if frames and rng is not None else 0
        return int(rng.integers(0, n - span + 1)) if n > span else 0

    def _decoded(self, start: int, kept):
        """(index, av frame) of the frames kept(index) wants, from the last keyframe at or before
        frame `start` on. Packets of frames it does not want are decoded only if other frames refer
        to them (the decoder skips non-reference frames: exact, as nothing predicts from them)."""
        pts, keys = self._index()
        index = {p: i for i, p in enumerate(pts)}
        if 0 < start < len(pts):
            key = max((k for k in keys if k <= pts[start]), default=pts[0])
            if key > pts[0]:  # a keyframe after the first: seek instead of decoding up to it
                self._container.seek(key, stream=self.stream, backward=True, any_frame=False)
        ctx = self.stream.codec_context
        for packet in self._container.demux(self.stream):
            i = index.get(packet.pts)
            ctx.skip_frame = "NONREF" if i is not None and not kept(i) else "DEFAULT"
            for f in packet.decode():
                self.decoded += 1
                if f.pts is None:  # no timestamps to tell frames by: decode from the start, counting
                    yield from self._restart()
                    return
                if f.pts in index:
                    yield index[f.pts], f

    def _restart(self):
        import av

        self._container.close()
        self._container = av.open(io.BytesIO(self._data))
        self.stream = self._container.streams.video[0]
        self.stream.thread_count = 1
        for i, f in enumerate(self._container.decode(self.stream)):
            self.decoded += 1
            yield i, f

    def frames(self, start: int = 0, stop: int | None = None, stride: int = 1, size: int | None = None,
               crop=None):
        """RGB uint8 HxWx3 frames start, start + stride, ... before stop (None: to the end), resized and
        cropped as resize_crop(frame, size, crop) would (size None: as decoded)."""
        from av.video.reformatter import Interpolation

        # bicubic as PIL's, chroma interpolated at full width (else swscale samples it at half width:
        # 6 levels off PIL at colour edges), rounded accurately
        scale = Interpolation.BICUBIC | Interpolation.FULL_CHR_H_INT | Interpolation.ACCURATE_RND
        stride = max(1, stride)

        def kept(i):
            return start <= i and (stop is None or i < stop) and (i - start) % stride == 0

        for i, f in self._decoded(start, kept):
            if stop is not None and i >= stop:
                break
            if not kept(i):
                continue
            if self.width is None:
                self.width, self.height = f.width, f.height
            if size is None:
                yield self._rgb.reformat(f, format="rgb24").to_ndarray()
            else:
                w, h, x, y = _fit(f.width, f.height, size, crop)
                if (w, h) == (f.width, f.height):
                    arr = self._rgb.reformat(f, format="rgb24").to_ndarray()
                else:
                    arr = self._rgb.reformat(f, width=w, height=h, format="rgb24", interpolation=scale,
                                             threads=1).to_ndarray()
                yield arr if (w, h) == (size, size) else arr[y:y + size, x:x + size]
            if stop is not None and i + stride >= stop:
                break  # the clip's last frame: decode no further


def read_video(data: bytes, frames: int = 0, rng=None, stride: int = 1,
               size: int | None = None) -> tuple[list[np.ndarray], float]:
    """(RGB uint8 HxWx3 frames, fps) of an encoded video: all of them, or a clip of `frames` frames
    (every stride-th) from a random start (rng) or the first, resized as resize_crop(f, size) with
    `size`. Only the clip's frames are converted; frames after it are never decoded, and frames
    before it only from the keyframe it needs (VideoReader)."""
    with VideoReader(data) as v:
        start = v.random_start(frames, rng, stride)
        stop = start + (frames - 1) * stride + 1 if frames else None
        decoded = list(v.frames(start, stop, stride, size))
        fps = v.fps
    if not decoded:
        raise ValueError("video has no frames")
    return decoded, fps


def encode_mp4(clip: np.ndarray, fps: int = 8) -> bytes:
    """uint8 TxHxWx3 -> H.264 mp4 bytes (PyAV). H and W must be even."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = clip.shape[2], clip.shape[1]
        stream.pix_fmt = "yuv420p"
        # near-lossless and deterministic: one thread, fixed quality
        stream.options = {"crf": "12", "preset": "veryfast", "threads": "1"}
        stream.thread_count = 1
        for frame in clip:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def encode_image(img: Image.Image, ext: str) -> bytes:
    buf = io.BytesIO()
    if ext == "jpg":
        img.convert("RGB").save(buf, "JPEG", quality=95)
    elif ext == "webp":
        img.save(buf, "WEBP", quality=95)
    else:
        img.save(buf, "PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Training inputs: uint8 tensors with channels first, augmented reproducibly


def _augment_draws(rng, random_crop, hflip):
    crop = (rng.random(), rng.random(), rng.random()) if rng is not None and random_crop else None
    flip = bool(rng is not None and hflip and rng.random() < 0.5)
    return crop, flip


def _channels_first(arr: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, C) -> uint8 with channels first: (C, H, W) or (C, T, H, W)."""
    import torch

    if not (arr.flags.writeable and arr.flags.c_contiguous):
        arr = np.array(arr)  # torch wants writable, contiguous memory
    t = torch.from_numpy(arr)
    return t.permute(2, 0, 1) if t.ndim == 3 else t.permute(3, 0, 1, 2)


def decode_image(data: bytes, size: int, channels: int, rng=None, random_crop=False, hflip=False) -> torch.Tensor:
    """Encoded image -> uint8 (C, size, size), centre-cropped, or randomly cropped / flipped by rng."""
    img = Image.open(io.BytesIO(data))
    crop, flip = _augment_draws(rng, random_crop, hflip)
    mode = "RGB" if channels == 3 else "L"
    if img.format == "JPEG":  # DCT-domain downscaling: a far cheaper decode of large JPEGs
        img.draft(mode, (size, size))
    img = resize_crop(img if img.mode == mode else img.convert(mode), size, crop)
    arr = np.array(img)
    arr = arr[..., None] if arr.ndim == 2 else arr
    return _channels_first(arr[:, ::-1] if flip else arr)


def decode_video(data: bytes, frames: int, size: int, channels: int, rng=None, random_crop=False,
                 hflip=False) -> torch.Tensor:
    """Encoded video -> uint8 (C, frames, size, size): consecutive frames (a random start with rng;
    the last frame repeats when the video is shorter), one crop and one flip for the whole clip.
    Frames are decoded at the clip's size (VideoReader): frames already at `size` and centre-cropped
    come out as they were encoded; others are scaled by swscale, within about a level of PIL."""
    with VideoReader(data) as v:
        start = v.random_start(frames, rng)
        crop, flip = _augment_draws(rng, random_crop, hflip)
        clip = list(v.frames(start, start + frames, 1, size, crop))
    if not clip:
        raise ValueError("video has no frames")
    clip += [clip[-1]] * (frames - len(clip))
    arr = np.stack(clip)
    if channels == 1:
        arr = arr.mean(-1, keepdims=True).astype(np.uint8)
    return _channels_first(arr[:, :, ::-1] if flip else arr)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [-1, 1]."""
    return x.float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Floats in [-1, 1] -> uint8 [0, 255] in the same layout, rounded as image files (and ADM's
    and DiT's sample exports) are."""
    import torch

    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
