"""Where a stream's frames come from and where its images go: image folders, video files (PyAV), PNG folders.

Sources yield (frame number, item); `load_frame` turns an item into a checked [1, 3, H, W] frame (a corrupt file,
a frame that is not RGB, or one of another size under the strict policy is a ConfigError naming it). Sinks write
each image whole: a PNG appears under its final name only when complete, a video only once it is closed.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..spec.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".gif")


def _av(path, what: str):
    try:
        import av
    except ImportError as exc:
        raise ConfigError(what, f"{path} is a video and reading or writing video needs PyAV",
                          'pip install av (or pip install "sdaccel[video]"); or use a folder of images') from exc
    return av


def folder_frames(folder):
    """(i, path) for the images in `folder`, in name order."""
    folder = Path(folder).expanduser()
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError("--input", f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})",
                          "point it at a folder of frames or a video file")
    return enumerate(files)


def video_frames(path):
    """(i, PIL image) for the frames of a video file, decoded as they are read."""
    av = _av(path, "--input")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise ConfigError("--input", f"cannot open the video {path}: {exc}", "check the file plays") from exc

    def frames():
        with container:
            try:
                for i, frame in enumerate(container.decode(video=0)):
                    yield i, frame.to_image()
            except av.error.FFmpegError as exc:
                raise ConfigError("--input", f"the video {path} is damaged after some frames: {exc}",
                                  "re-encode or trim the file") from exc
    return frames()


def frame_source(path):
    """Frames from a folder of images or a video file."""
    path = Path(path).expanduser()
    if path.is_dir():
        return folder_frames(path)
    if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        return video_frames(path)
    if path.is_file():
        raise ConfigError("--input", f"{path} is neither a video ({', '.join(VIDEO_SUFFIXES)}) nor a folder",
                          "give a folder of images or a video file")
    raise ConfigError("--input", f"{path} does not exist", "give a folder of images or a video file")


def load_frame(item, width: int, height: int, resize: str = "fit"):
    """A [1, 3, height, width] 0..1 frame from a path, a PIL image or an image tensor."""
    import torch

    from ..run.sampler import load_image_tensor

    frame = load_image_tensor(item)
    if frame.shape[0] != 1:
        raise ConfigError("frame", f"{item if isinstance(item, (str, Path)) else 'a frame'} holds "
                          f"{frame.shape[0]} images", "send one image per frame")
    if tuple(frame.shape[-2:]) != (height, width):
        if resize == "strict":
            raise ConfigError("frame", f"{item if isinstance(item, (str, Path)) else 'a frame'} is "
                              f"{frame.shape[-1]}x{frame.shape[-2]}, the stream is {width}x{height}",
                              "send frames of the stream's size, or use resize fit")
        frame = torch.nn.functional.interpolate(frame, size=(height, width), mode="bilinear", align_corners=False,
                                                antialias=True).clamp(0, 1)
    return frame


def _pil(image):
    """[H, W, 3] floats in 0..1 -> a PIL image."""
    import torch
    from PIL import Image

    return Image.fromarray((image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())


class FolderSink:
    """Writes each image as `frame_NNNNNN.png` (written beside, then renamed: never half a file)."""

    def __init__(self, folder):
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.written: list = []

    def __call__(self, output) -> None:
        path = self.folder / f"frame_{output.frame:06d}.png"
        partial = path.with_name(path.name + ".partial")
        _pil(output.image).save(partial, format="PNG")
        os.replace(partial, path)
        self.written.append(path)

    def close(self) -> None:
        pass


class VideoSink:
    """Encodes the images into a video file, in frame order; the file appears when `close` completes."""

    def __init__(self, path, fps: float = 24.0):
        self.path = Path(path).expanduser()
        self._av = _av(self.path, "--output")
        self.partial = self.path.with_name(self.path.name + ".partial" + self.path.suffix)
        self.fps = fps
        self._container = self._stream = None
        self.written = 0

    def __call__(self, output) -> None:
        image = _pil(output.image)
        if self._container is None:
            from fractions import Fraction

            self._container = self._av.open(str(self.partial), mode="w")
            self._stream = self._container.add_stream("mpeg4" if self.path.suffix.lower() != ".gif" else "gif",
                                                      rate=Fraction(self.fps).limit_denominator(1000))
            self._stream.width, self._stream.height = image.size
            self._stream.pix_fmt = "yuv420p" if self.path.suffix.lower() != ".gif" else "rgb8"
        frame = self._av.VideoFrame.from_image(image)
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.written += 1

    def close(self) -> None:
        if self._container is None:
            return
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        os.replace(self.partial, self.path)


__all__ = ["frame_source", "folder_frames", "video_frames", "load_frame", "FolderSink", "VideoSink",
           "IMAGE_SUFFIXES", "VIDEO_SUFFIXES"]
