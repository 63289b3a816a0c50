"""Frames in and images out on their own threads while the UNet loop runs (StreamDiffusion's input/output queues).

A reader thread loads and checks frames into a bounded input queue; the caller's thread runs the stream; a writer
thread hands images to the sink. A full input queue either blocks the reader (files: nothing lost) or drops the
oldest waiting frame (a camera: the stream stays live; drops are counted). The output queue always blocks, so no
image is lost. A bad frame becomes a `FrameError` reported to the sink and the stream goes on; `stop()` (or
Ctrl+C in the caller's thread) ends every thread cleanly: nothing half-written, the frames in flight dropped.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from ..spec.errors import SDAccelError

CLOSED = object()  # what `get` returns once a queue is closed and empty


@dataclass
class FrameError:
    """A frame the stream could not use: which one, and why (the exception's message names the fix)."""

    frame: int
    source: str
    message: str


class FrameQueue:
    """A bounded queue with a full-queue policy ("block" or "drop_oldest") and a close that wakes everyone."""

    def __init__(self, size: int, policy: str = "block"):
        self.size, self.policy = size, policy
        self._items: deque = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0
        self.high_water = 0

    def put(self, item) -> bool:
        """Queue `item` (False if the queue was closed meanwhile: the item is not queued)."""
        with self._cond:
            while self.policy == "block" and len(self._items) >= self.size and not self._closed:
                self._cond.wait(0.1)
            if self._closed:
                return False
            if len(self._items) >= self.size:
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self.high_water = max(self.high_water, len(self._items))
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None = None):
        """The next item; CLOSED once closed and drained; None after `timeout` seconds with nothing."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait_for(lambda: self._items or self._closed, timeout)
            if self._items:
                item = self._items.popleft()
                self._cond.notify_all()
                return item
            return CLOSED if self._closed else None

    def close(self, *, discard: bool = False) -> None:
        """No more puts; `discard` also empties what waits (a stop, not the end of the input)."""
        with self._cond:
            self._closed = True
            if discard:
                self._items.clear()
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


class StreamRunner:
    """Runs a StreamPipeline between a frame source and a sink, with the reader and writer on their own threads.

    `source` yields (frame_id, item) where item is whatever `load(item)` turns into a [1, 3, H, W] frame (None for
    txt2img); `sink(output)` receives StreamOutputs and FrameErrors in order, on the writer thread."""

    def __init__(self, stream, source, load, sink, *, queue_size: int = 4, policy: str = "block"):
        self.stream, self.source, self.load, self.sink = stream, source, load, sink
        self.inputs = FrameQueue(queue_size, policy)
        self.outputs = FrameQueue(queue_size, "block")
        self._stop = threading.Event()
        self.errors: list = []
        self.failure: BaseException | None = None

    def stop(self) -> None:
        self._stop.set()
        self.inputs.close(discard=True)

    def _read(self) -> None:
        try:
            for frame_id, item in self.source:
                if self._stop.is_set():
                    break
                try:
                    frame = self.load(item)
                except SDAccelError as exc:
                    error = FrameError(frame_id, str(item), str(exc))
                    self.errors.append(error)
                    self.outputs.put(error)
                    continue
                if not self.inputs.put((frame_id, frame)):
                    break
        except BaseException as exc:  # a broken source ends the stream with its error, threads still joined
            self.failure = exc
        finally:
            self.inputs.close()

    def _write(self) -> None:
        while True:
            item = self.outputs.get()
            if item is CLOSED:
                return
            try:
                self.sink(item)
            except BaseException as exc:  # a failing sink stops the stream (disk full): reported by run()
                self.failure = self.failure or exc
                self.stop()
                self.outputs.close(discard=True)
                return

    def run(self) -> dict:
        """Stream everything; the stream's statistics plus the queues' (dropped frames, errors)."""
        reader = threading.Thread(target=self._read, name="sdaccel-stream-reader", daemon=True)
        writer = threading.Thread(target=self._write, name="sdaccel-stream-writer", daemon=True)
        reader.start()
        writer.start()
        interrupted = False
        try:
            with self.stream:
                while not self._stop.is_set():
                    item = self.inputs.get(timeout=0.2)
                    if item is CLOSED:
                        break
                    if item is None:
                        continue
                    frame_id, frame = item
                    for output in self.stream.push(frame, frame_id):
                        self.outputs.put(output)
                if not self._stop.is_set():
                    for output in self.stream.flush():
                        self.outputs.put(output)
        except KeyboardInterrupt:
            interrupted = True
            self.stop()
        finally:
            self.inputs.close(discard=True)
            self.outputs.close()
            reader.join()
            writer.join()
        if self.failure is not None:
            raise self.failure
        summary = self.stream.stats.summary()
        summary.update(dropped=self.inputs.dropped, errors=len(self.errors), interrupted=interrupted)
        return summary


__all__ = ["FrameQueue", "FrameError", "StreamRunner", "CLOSED"]
