"""The standalone web UI's Live tab: the browser's webcam in, the stream's images out (issue 13).

The stream runs as ONE job in the session's generation queue, so a txt2img never runs beside it: the job holds
the prepared pipeline (`cache.use(spec)`) and a StreamPipeline, and takes frames from a small drop-the-oldest
FrameQueue until it is stopped or interrupted. The webcam's stream handler only checks a frame into that queue
(a bad frame is reported and the stream goes on) and returns the newest image. Start submits the job, Stop ends
it, and a settings change while it runs replaces it by a job with that one setting changed (each control sends
only its own value: an event that arrives late carries no stale copy of the others). One live stream per server:
a second browser pressing Start takes it over. Plain Python up to `build_live` (gradio only there).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..optim.spec.errors import SDAccelError
from ..optim.stream.queues import CLOSED, FrameQueue
from .controls import ui_fields, value_of
from .service import QueueFull

FPS_WINDOW_S = 2.0  # the readout's fps counts the images of the last FPS_WINDOW_S seconds
POLL_S = 0.1  # how often the job looks for a stop while no frame arrives
STREAM_EVERY_S = 0.1  # how often the browser sends a camera frame
SKIP = ("queue_policy",)  # a camera always drops its oldest waiting frame: the stream stays live


def live_fields():
    from ..optim.stream.settings import StreamSettings

    return ui_fields(StreamSettings, skip=SKIP)


def live_settings(values: dict):
    """StreamSettings from {field name: control value} (a bad value is a ConfigError naming the field)."""
    from ..optim.stream.settings import StreamSettings

    fields = {info.name: value_of(info, values[info.name]) for info in live_fields() if info.name in values}
    return StreamSettings(**fields, queue_policy="drop_oldest")


def live_spec(session, checkpoint: str | None, family: str | None, tiny_vae: str = ""):
    """The stream's PipelineSpec: the checkpoint (and family) chosen at the top of the page, with the Tiny VAE
    when a path is given (the Generate tab's optimizations are not used)."""
    from ..optim.spec.errors import ConfigError
    from ..optim.units.vae.config import VaeConfig

    if not checkpoint:
        raise ConfigError("Checkpoint", "none selected", "pick a checkpoint at the top of the page")
    tiny_vae = (tiny_vae or "").strip()
    optimizations = [VaeConfig(variant="tiny", path=tiny_vae)] if tiny_vae else []
    spec, _ = session.spec(optimizations, checkpoint=checkpoint, family=family or None, field="Checkpoint")
    return spec


def to_pixels(image):
    """[H, W, 3] floats in 0..1 -> an [H, W, 3] uint8 array (what gradio shows)."""
    import torch

    return (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


@dataclass
class LiveRun:
    """One live job: its spec and settings, its frame queue, and what it produced."""

    spec: object
    settings: object
    frames: FrameQueue
    page: tuple = ()  # (spec, settings) as the page gave them (the prompt with its LoRA tags), for changes
    stop: threading.Event = field(default_factory=threading.Event)
    job: object = None
    stream: object = None  # the StreamPipeline, once the job runs
    latest: object = None  # the newest image ([H, W, 3] uint8)
    frames_out: int = 0
    out_times: deque = field(default_factory=lambda: deque(maxlen=512))
    out_frames: deque = field(default_factory=lambda: deque(maxlen=512))  # the recent images' frame numbers
    next_frame: int = 0
    bad_frames: int = 0
    last_error: str = ""

    def end(self) -> None:
        """Stop taking frames; the job leaves its loop (or never starts, if it still waits in the queue)."""
        self.stop.set()
        self.frames.close(discard=True)
        if self.job is not None:
            self.job.future.cancel()  # only succeeds while it waits

    def publish(self, output) -> None:
        self.latest = to_pixels(output.image)
        self.frames_out += 1
        self.out_times.append(time.perf_counter())
        self.out_frames.append(output.frame)

    def fps(self) -> float:
        now = time.perf_counter()
        recent = [t for t in self.out_times if t >= now - FPS_WINDOW_S]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(now - recent[0], 1e-6)


class LiveStream:
    """The server's one live stream, run as a job of `service` (a GenerationService) on `cache`'s pipelines."""

    def __init__(self, service, *, cache=None, resolve=None):
        """`resolve(spec, settings)`: the (spec, settings) the engine runs for the page's (the web UI's session
        takes the prompt's `<lora:name:strength>` tags into the spec)."""
        self.service = service
        self.cache = cache
        self.resolve = resolve
        self._lock = threading.Lock()
        self._changing = threading.Lock()  # two controls (or a control and the model) changed at once: both land
        self._run: LiveRun | None = None

    @property
    def current(self) -> LiveRun | None:
        return self._run

    @property
    def active(self) -> bool:
        """A job is queued or running and was not stopped."""
        run = self._run
        return run is not None and not run.stop.is_set() and not run.job.future.done()

    def start(self, spec, settings) -> LiveRun:
        """Queue a live job with `spec` and `settings`, replacing the running one (QueueFull when the queue is
        full: the running stream then goes on unchanged)."""
        page = (spec, settings)
        if self.resolve is not None:
            spec, settings = self.resolve(spec, settings)
        run = LiveRun(spec, settings, FrameQueue(settings.queue_size, "drop_oldest"), page=page)
        with self._lock:
            run.job = self.service.submit(self._work(run), label="live")
            old, self._run = self._run, run
        if old is not None:
            old.end()
        return run

    def restart(self, spec, settings) -> bool:
        """Apply new settings to an active stream (a new job); False when nothing runs or nothing changed."""
        run = self._run
        if not self.active or run.page == (spec, settings):
            return False
        self.start(spec, settings)
        return True

    def change(self, name: str, value) -> bool:
        """Apply one stream setting (a control's raw value) to an active stream: a new job with only that field
        changed. False when nothing runs or the value is already in force; a bad value is a ConfigError naming
        the field, and the stream goes on unchanged."""
        from dataclasses import replace

        info = next((i for i in live_fields() if i.name == name), None)
        if info is None:
            raise KeyError(f"no live stream setting named {name!r}")
        with self._changing:
            run = self._run
            if not self.active:
                return False
            spec, settings = run.page
            return self.restart(spec, replace(settings, **{name: value_of(info, value)}))

    def change_spec(self, spec) -> bool:
        """Run the active stream on another spec (the page's model or Tiny VAE changed), its settings kept."""
        with self._changing:
            run = self._run
            if not self.active:
                return False
            return self.restart(spec, run.page[1])

    def stop(self, timeout: float = 10.0) -> LiveRun | None:
        """End the stream; waits up to `timeout` for a running job to leave its loop."""
        run = self._run
        if run is None:
            return None
        run.end()
        if run.job.future.running():
            try:
                run.job.future.exception(timeout)
            except Exception:  # noqa: BLE001 - a cancelled job or a timeout: the readout says what it knows
                pass
        return run

    def feed(self, image):
        """Check a camera frame into the active stream's queue: the newest image (None before the first one).
        A frame that cannot be used is counted and named in the readout; the stream goes on."""
        from ..optim.stream.frames import load_frame

        run = self._run
        if run is None or not self.active:
            return None if run is None else run.latest
        s = run.settings
        try:
            frame = load_frame(image, s.width, s.height, s.resize)
        except SDAccelError as exc:
            run.bad_frames += 1
            run.last_error = str(exc)
            return run.latest
        run.frames.put((run.next_frame, frame))
        run.next_frame += 1
        return run.latest

    def _work(self, run: LiveRun):
        def work(progress, should_interrupt):
            from ..optim.run.cache import default_cache
            from ..optim.stream.pipeline import StreamPipeline

            if run.stop.is_set():
                return None
            cache = self.cache if self.cache is not None else default_cache()
            with cache.use(run.spec) as prepared, StreamPipeline(prepared, run.settings) as stream:
                run.stream = stream
                while not run.stop.is_set() and not should_interrupt():
                    item = run.frames.get(timeout=POLL_S)
                    if item is CLOSED:
                        break
                    if item is not None:
                        for output in stream.push(item[1], item[0]):
                            run.publish(output)
            return stream.stats.summary()
        work.spec = run.spec  # what the job will load, for a job scope that makes room for it
        return work

    def readout(self) -> str:
        """One line: what the stream is doing, its fps and latency, skipped and dropped frames, the last error."""
        run = self._run
        if run is None:
            return "not started: press Start, then the camera's Record button"
        future, stream = run.job.future, run.stream
        if future.done() and not future.cancelled() and future.exception() is not None:
            return f"**Error:** {future.exception()}"
        if stream is None:
            state = "stopped" if run.stop.is_set() else \
                f"waiting for the generation queue ({self.service.waiting} queued)" if run.job.started is None \
                else "loading the model"
            return state + self._bad(run)
        stats = stream.stats.summary()
        state = "running" if not future.done() else "stopped"
        latency = "latency p50 -" if stats["latency_p50_s"] is None else \
            f"latency p50 {stats['latency_p50_s']:.3f} s, p95 {stats['latency_p95_s']:.3f} s"
        fps = run.fps() if state == "running" else stats["fps"]
        return (f"{state}: {fps:.1f} fps, {latency}, skipped {stats['skipped']}, dropped {run.frames.dropped}, "
                f"frames {stats['frames_in']} in / {stats['frames_out']} out" + self._bad(run))

    @staticmethod
    def _bad(run: LiveRun) -> str:
        return f"; {run.bad_frames} bad frames, last: {run.last_error}" if run.bad_frames else ""


def build_live(gr, session, *, checkpoint, family, live: LiveStream | None = None) -> LiveStream:
    """The Live tab's contents (call inside a `gr.Tab`): the camera, the stream, Start/Stop, the readout and the
    stream settings; `checkpoint` and `family` are the page's model controls. gradio 4+ (standalone UI only)."""
    from .controls import control

    live = live if live is not None else LiveStream(
        session.service, resolve=lambda spec, settings: session.prompt_loras(spec, settings, field="Live: prompt"))
    with gr.Row():
        with gr.Column(scale=2):
            with gr.Row():
                camera = gr.Image(sources=["webcam"], streaming=True, type="pil", label="Camera",
                                  elem_id="sdaccel_live_camera")
                output = gr.Image(streaming=True, label="Stream", interactive=False, elem_id="sdaccel_live_output")
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="sdaccel_live_start")
                stop = gr.Button("Stop", elem_id="sdaccel_live_stop")
            readout = gr.Markdown(live.readout(), elem_id="sdaccel_live_readout")
        with gr.Column(scale=1):
            tiny_vae = gr.Textbox(value="", label="Live: Tiny VAE file", elem_id="sdaccel_live_tiny_vae",
                                  info="A TAESD decoder (taesd_decoder.pth; the encoder beside it): far faster "
                                       "frames, slightly softer (empty: the model's own VAE)")
            fields = live_fields()
            settings = [control(gr, info, elem_id=f"sdaccel_live_{info.name}", group="Live") for info in fields]
    names = [info.name for info in fields]

    def job_args(values):
        checkpoint_title, family_name, tiny, *rest = values
        return live_spec(session, checkpoint_title, family_name, tiny), live_settings(dict(zip(names, rest)))

    def on_start(*values):
        try:
            live.start(*job_args(values))
        except (SDAccelError, QueueFull) as exc:
            return f"**Error:** {exc}"
        return live.readout()

    def on_stop():
        live.stop()
        return live.readout()

    def on_spec_change(checkpoint_title, family_name, tiny):
        if not live.active:
            return gr.update()
        try:
            live.change_spec(live_spec(session, checkpoint_title, family_name, tiny))
        except (SDAccelError, QueueFull) as exc:
            return f"**Error:** {exc} (the stream goes on with its earlier settings)"
        return live.readout()

    def on_setting_change(name):
        def on_change(value):
            try:
                if not live.change(name, value):
                    return gr.update()
            except (SDAccelError, QueueFull) as exc:
                return f"**Error:** {exc} (the stream goes on with its earlier settings)"
            return live.readout()
        return on_change

    def on_frame(image):
        latest = live.feed(image) if image is not None else None
        return (gr.update() if latest is None else latest), live.readout()

    inputs = [checkpoint, family, tiny_vae, *settings]
    start.click(fn=on_start, inputs=inputs, outputs=[readout])
    stop.click(fn=on_stop, inputs=None, outputs=[readout])
    tiny_vae.blur(fn=on_spec_change, inputs=[checkpoint, family, tiny_vae], outputs=[readout])
    for name, component in zip(names, settings):
        event = getattr(component, "release", None) or component.change  # a slider restarts once, on release
        (component.blur if isinstance(component, gr.Textbox) else event)(
            fn=on_setting_change(name), inputs=[component], outputs=[readout])
    camera.stream(fn=on_frame, inputs=[camera], outputs=[output, readout], stream_every=STREAM_EVERY_S,
                  time_limit=None, concurrency_limit=1)
    return live


__all__ = ["LiveStream", "LiveRun", "build_live", "live_fields", "live_settings", "live_spec"]
