"""The A1111 HTTP API (`/sdapi/v1/...`) on SDAccel's engine, as FastAPI routes.

Generation requests go through the session's bounded queue: a full queue answers 503 at once, a bad body 422
naming the A1111 field, and a request is checked completely before it is queued, so nothing half-runs. The
route handlers are async and wait on the job's future, so waiting clients hold no worker thread.
(No `from __future__ import annotations` here: FastAPI reads the handlers' `Request` annotations at run time.)
"""


import asyncio
import json
import logging
import time

from ..optim.spec.errors import ConfigError, GenerationInterrupted, SDAccelError
from . import a1111
from .hashes import known_sha256, short_hash
from .service import BatchesInterrupted, QueueFull, ServiceClosed, engine_job

log = logging.getLogger(__name__)


def _apply_presets(spec, request, names):
    from ..optim.bench.presets import resolve_preset

    for name in names:
        spec, request = resolve_preset(name).apply(spec, request)
    return spec, request


def plan_generation(session, parsed: a1111.ParsedRequest):
    """(spec, requests, checkpoint entry) for a parsed body, checked before anything is queued; the requests are
    the n_iter batches, with the presets' request changes."""
    from ..optim.spec.optimization import check_conflicts

    spec, entry = session.spec(checkpoint=parsed.checkpoint)
    spec, request = session.prompt_loras(spec, parsed.request)
    spec, request = _apply_presets(spec, request, parsed.presets)
    for cfg in parsed.optimizations:
        spec = spec.with_optimization(cfg)
    check_conflicts(spec.optimizations)
    batch = request.batch_size
    requests = [request.with_(seed=(request.seed + i * batch) % 2**64) for i in range(parsed.n_iter)]
    return spec, requests, entry


def create_app(session, *, app=None):
    """A FastAPI app (or `app`, e.g. one gradio is mounted on) serving the A1111 API over `session`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = app or FastAPI(title="SDAccel (A1111-compatible API)")

    def unprocessable(exc: a1111.PayloadError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": exc.detail(), "error": "PayloadError",
                                                      "errors": str(exc)})

    async def body_of(request: Request):
        raw = await request.body()
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise a1111.PayloadError("", f"the body is not JSON ({exc})") from exc

    async def generate(request: Request, img2img: bool):
        try:
            parsed = a1111.parse(await body_of(request), img2img=img2img)
            spec, requests, entry = plan_generation(session, parsed)
        except a1111.PayloadError as exc:
            return unprocessable(exc)
        except ConfigError as exc:
            return unprocessable(a1111.PayloadError(exc.field, str(exc)))
        try:
            job = session.service.submit(engine_job(spec, requests), label="img2img" if img2img else "txt2img")
        except (QueueFull, ServiceClosed) as exc:
            return JSONResponse(status_code=503, content={"error": type(exc).__name__, "detail": str(exc)},
                                headers={"Retry-After": "5"})
        try:
            results = await asyncio.wrap_future(job.future)
        except GenerationInterrupted as exc:  # A1111 answers with the images finished before the interrupt
            parsed.notes.append(f"interrupted: {exc}")
            results = exc.results if isinstance(exc, BatchesInterrupted) else []
        except SDAccelError as exc:
            return JSONResponse(status_code=400, content={"error": type(exc).__name__, "detail": str(exc)})
        except Exception as exc:  # noqa: BLE001 - the server keeps serving; the client learns what failed
            log.exception("generation %s failed", job.id)
            return JSONResponse(status_code=500, content={"error": type(exc).__name__, "detail": str(exc)})
        model_hash = await asyncio.to_thread(short_hash, entry.path)  # seconds once per file, then cached
        return a1111.response(results, spec, parsed, requests[0], model_title=entry.title, model_hash=model_hash)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        return await generate(request, img2img=False)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        return await generate(request, img2img=True)

    @app.get("/sdapi/v1/sd-models")
    def sd_models():  # hashes known from earlier responses; listing never hashes (A1111 neither)
        listed = []
        for e in session.catalog.entries():
            sha = known_sha256(e.path)
            listed.append({"title": e.title, "model_name": e.model_name, "hash": sha[:10] if sha else None,
                           "sha256": sha, "filename": e.path, "config": None})
        return listed

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints():
        return None  # listed afresh on every call

    @app.get("/sdapi/v1/samplers")
    def samplers():
        return a1111.samplers()

    @app.get("/sdapi/v1/schedulers")
    def schedulers():
        return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
                 "need_inner_model": False},
                {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
                 "need_inner_model": False}]

    def options_now() -> dict:
        try:
            title = session.selected.title
        except ConfigError:
            title = None
        return {"sd_model_checkpoint": title, "sdaccel_family": session.family, "sdaccel_device": session.device,
                "sdaccel_queue_size": session.service.queue_size, "samples_format": "png"}

    @app.get("/sdapi/v1/options")
    def get_options():
        return options_now()

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        try:
            body = await body_of(request)
            if not isinstance(body, dict):
                raise a1111.PayloadError("", "expected an object of option name -> value")
            unknown = sorted(set(body) - {"sd_model_checkpoint"})
            if "sd_model_checkpoint" in body:
                session.select(str(body["sd_model_checkpoint"]))
        except a1111.PayloadError as exc:
            return unprocessable(exc)
        except ConfigError as exc:
            return unprocessable(a1111.PayloadError(exc.field, str(exc)))
        if unknown:  # A1111 ignores options it does not know, too; say which
            log.info("options not implemented by SDAccel, ignored: %s", ", ".join(unknown))
        return None

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False):
        state = session.service.state()
        running = state["running"]
        done = running["step"] / running["total"] if running and running["total"] else 0.0
        eta = running["elapsed_s"] / done - running["elapsed_s"] if running and done > 0 else 0.0
        stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(running["started"])) if running else 0
        return {"progress": round(done, 4), "eta_relative": round(eta, 3),
                "state": {"skipped": False, "interrupted": bool(running and running["interrupting"]),
                          "stopping_generation": False, "job": f"task({running['id']})" if running else "",
                          "job_count": state["waiting"] + (1 if running else 0), "job_timestamp": stamp,
                          "job_no": 0, "sampling_step": running["step"] if running else 0,
                          "sampling_steps": running["total"] if running else 0},
                "current_image": None, "textinfo": None, "current_task": f"task({running['id']})" if running else None,
                "sdaccel": state}

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        session.service.interrupt()
        return None

    @app.post("/sdapi/v1/skip")
    def skip():
        session.service.interrupt()
        return None

    return app
