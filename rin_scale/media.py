"""Pixels in and out: decoding, resizing and cropping images and video clips, encoding them, and
the conversions between uint8 pixels and the model's [-1, 1] floats. Used alike by the data
pipeline, the shard tool, the shard inspector, the sampler CLI and the eval service, so that a
picture is resized the same way when it is sharded and when it is trained on.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # sample members that hold an image
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")  # sample members that hold a video clip
RANDOM_CROP_SCALE = 1.25  # random crops: the shorter side is first resized to [1, 1.25] x size (as ADM)


def resize_crop(img: Image.Image, size: int, crop=None) -> Image.Image:
    """Resize the shorter side to size (bicubic) and crop a centred square along the longer one; or,
    with crop=(fx, fy, fs) in [0, 1), resize the shorter side to size * (1 + (RANDOM_CROP_SCALE - 1) fs)
    and crop at fractions (fx, fy), so square data sharded at the training size is cropped too.
    A square image already at `size` and centre-cropped is returned as it is."""
    w, h = img.size
    target = size if crop is None else round(size * (1 + (RANDOM_CROP_SCALE - 1) * crop[2]))
    s = target / min(w, h)
    if s != 1:
        img = img.resize((max(target, round(w * s)), max(target, round(h * s))), Image.BICUBIC)
    w, h = img.size
    if (w, h) == (size, size):
        return img
    if crop is not None:
        x, y = int(crop[0] * (w - size + 1)), int(crop[1] * (h - size + 1))
    else:
        x, y = (w - size) // 2, (h - size) // 2
    return img.crop((x, y, x + size, y + size))


def read_video(data: bytes, frames: int = 0, rng=None) -> tuple[list[np.ndarray], float]:
    """(RGB uint8 HxWx3 frames, fps) of an encoded video: all of them, or `frames` consecutive ones
    from a random start (rng) or the first. Frames after the clip are never decoded."""
    import av
    from av.video.reformatter import VideoReformatter

    # One reformatter for the clip: frame.to_ndarray(format="rgb24") builds a swscale context per
    # frame, which took 9 of the 10 ms that 8 frames of 16x16 cost (the same bytes either way).
    rgb = VideoReformatter()
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 8)
        n = stream.frames  # from the container's index; 0 when unknown: then decode all to count
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
    the last frame repeats when the video is shorter), one crop and one flip for the whole clip."""
    clip, _ = read_video(data, frames, rng)
    clip += [clip[-1]] * (frames - len(clip))
    crop, flip = _augment_draws(rng, random_crop, hflip)
    if clip[0].shape[:2] != (size, size) or crop is not None:
        clip = [np.asarray(resize_crop(Image.fromarray(f), size, crop)) for f in clip]
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
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
