"""`python -m sdaccel webui loadtest`: the A1111 API under load, as a measured table (never a test's time limit).

A server (`python -m sdaccel webui --api-only`) is started on 127.0.0.1 with a tiny random SD 1.5 model, in its own
process so its memory is its own. Then:
- reference: one image per seed, one request at a time;
- burst: `burst` requests opened at once from `clients` HTTP clients (each with burst/clients requests in
  flight, every request on its own thread, all released together); each is answered (its image compared with
  the reference of its seed) or refused with 503 and a Retry-After header (queue full); nothing else is
  acceptable;
- soak: `soak` more requests from `clients` clients, one in flight each; the queue must hold `clients` requests
  so none is refused. The server's resident memory is read from /proc after the warm-up and at the end (growth
  in %), with the latency median and spread.
"""

from __future__ import annotations

import base64
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..optim.bench.processes import LOOPBACK, free_port, stop_process, wait_for_http
from ..optim.spec.errors import ConfigError
from .service import DEFAULT_QUEUE_SIZE


@dataclass
class LoadSettings:
    burst: int = 50
    clients: int = 10
    soak: int = 300
    warmup: int = 30
    queue_size: int = DEFAULT_QUEUE_SIZE  # the server's default; the soak needs at least `clients`
    size: int = 64
    steps: int = 2
    seeds: int = 10  # the burst cycles through this many seeds, each checked against its reference image
    checkpoint: str = "synthetic-tiny:sd15"

    def check(self) -> None:
        if self.clients < 1:
            raise ConfigError("clients", f"{self.clients} is below 1", "use --clients 1 or more")
        if self.soak and self.queue_size < self.clients:
            raise ConfigError("queue_size", f"{self.queue_size} is below the {self.clients} soak clients",
                              "a request finishing and its client's next one can meet the other clients' "
                              "requests all waiting: use --queue-size >= --clients (or --soak 0)")


class ServerProcess:
    """`python -m sdaccel webui --api-only` in a child process on 127.0.0.1."""

    def __init__(self, *, checkpoint: str | None = None, queue_size: int = 8, models=(), ui: bool = False,
                 log_path=None, loras=()):
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        args = [sys.executable, "-m", "sdaccel", "webui", "--port", str(self.port), "--queue-size", str(queue_size)]
        args += ["--checkpoint", checkpoint] if checkpoint else []
        args += [a for m in models for a in ("--models", str(m))]
        args += [a for folder in loras for a in ("--loras", str(folder))]
        if not ui:
            args.append("--api-only")
        self.log_path = Path(log_path) if log_path else Path(os.devnull)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180.0) -> None:
        wait_for_http(self.url + "/sdapi/v1/options", self.proc, timeout, name="the web UI server",
                      detail=lambda: f"; see {self.log_path}")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        stop_process(self.proc, 30)
        self._log.close()


def decode_png(text: str):
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(text))) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def txt2img(client, url: str, settings: LoadSettings, seed: int):
    body = {"prompt": "a lighthouse at dusk", "negative_prompt": "blurry", "seed": seed, "steps": settings.steps,
            "width": settings.size, "height": settings.size, "cfg_scale": 7, "sampler_name": "Euler a"}
    start = time.perf_counter()
    response = client.post(url + "/sdapi/v1/txt2img", json=body, timeout=600)
    return response, time.perf_counter() - start


def _fan_out(count: int, clients: int, task, *, in_flight: int = 1) -> tuple[list, int]:
    """Run task(client, i) for i < count over `clients` HTTP clients, each with `in_flight` requests open at a
    time (a thread each), every thread released at once. (results in order, the most requests seen open at once)"""
    import httpx

    threads = clients * in_flight
    results: list = [None] * count
    gate = threading.Barrier(threads)
    lock = threading.Lock()
    open_now, peak = [0], [0]
    pool = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    sessions = [httpx.Client(limits=pool) for _ in range(clients)]

    def worker(t: int):
        client = sessions[t % clients]
        gate.wait()
        for i in range(t, count, threads):
            with lock:
                open_now[0] += 1
                peak[0] = max(peak[0], open_now[0])
            try:
                results[i] = task(client, i)
            except Exception as exc:  # noqa: BLE001 - counted as a failure in the report
                results[i] = exc
            finally:
                with lock:
                    open_now[0] -= 1

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    try:
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
    finally:
        for client in sessions:
            client.close()
    return results, peak[0]


def _spread(values: list[float]) -> dict:
    if not values:
        return {"median_s": None, "min_s": None, "max_s": None}
    return {"median_s": round(statistics.median(values), 3), "min_s": round(min(values), 3),
            "max_s": round(max(values), 3)}


def _phase(name: str, fanned: tuple[list, int], references: dict, settings: LoadSettings) -> dict:
    results, peak = fanned
    answered, refused, wrong, errors, times = 0, 0, 0, [], []
    for i, item in enumerate(results):
        if isinstance(item, Exception):
            errors.append(f"{type(item).__name__}: {item}")
            continue
        response, elapsed = item
        if response.status_code == 503 and response.headers.get("retry-after"):
            refused += 1
        elif response.status_code == 200:
            answered += 1
            times.append(elapsed)
            image = decode_png(response.json()["images"][0])
            if int(abs(image - references[i % settings.seeds]).max()) > 1:
                wrong += 1
        else:
            errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
    return {"phase": name, "requests": len(results), "peak_in_flight": peak, "answered": answered,
            "refused_503": refused, "images_not_matching_seed": wrong, "other": len(errors), "errors": errors[:5],
            **_spread(times)}


def run_loadtest(settings: LoadSettings, *, say=print, log_path=None) -> dict:
    import httpx

    from ..optim.run.capabilities import machine_summary

    settings.check()
    server = ServerProcess(checkpoint=settings.checkpoint, queue_size=settings.queue_size, log_path=log_path)
    try:
        server.wait_ready()
        references = {}
        with httpx.Client() as client:
            for seed in range(settings.seeds):
                response, _ = txt2img(client, server.url, settings, seed)
                if response.status_code != 200:
                    raise RuntimeError(f"reference seed {seed}: HTTP {response.status_code} {response.text[:300]}")
                references[seed] = decode_png(response.json()["images"][0])
        say(f"references: {settings.seeds} seeds; burst of {settings.burst} at once from {settings.clients} "
            "clients ...")
        per_client = -(-settings.burst // settings.clients)
        burst = _phase("burst", _fan_out(settings.burst, settings.clients,
                                         lambda c, i: txt2img(c, server.url, settings, i % settings.seeds),
                                         in_flight=per_client), references, settings)
        rows = [burst]
        memory = {}
        if settings.soak:
            say(f"soak: {settings.soak} requests from {settings.clients} clients ...")
            samples: list[tuple[int, float]] = []
            done = [0]
            lock = threading.Lock()

            def soak_task(client, i):
                result = txt2img(client, server.url, settings, i % settings.seeds)
                with lock:
                    done[0] += 1
                    if done[0] == settings.warmup or done[0] % 25 == 0 or done[0] == settings.soak:
                        samples.append((done[0], server.rss_mb()))
                return result

            # never refused: the queue holds a request of every client (checked above)
            rows.append(_phase("soak", _fan_out(settings.soak, settings.clients, soak_task), references, settings))
            after_warmup = next((mb for n, mb in samples if n >= settings.warmup), samples[0][1])
            final = samples[-1][1]
            memory = {"rss_after_warmup_mb": round(after_warmup, 1), "rss_final_mb": round(final, 1),
                      "growth_pct": round(100 * (final - after_warmup) / after_warmup, 2),
                      "samples": [(n, round(mb, 1)) for n, mb in sorted(samples)]}
        return {"machine": machine_summary(), "settings": asdict(settings), "rows": rows, "memory": memory,
                "date": time.strftime("%Y-%m-%d %H:%M")}
    finally:
        server.stop()


def format_report(report: dict) -> str:
    lines = [f"A1111 API under load on {report['machine'].get('cpu')} ({report['machine'].get('cores')} cores), "
             f"{report['settings']['checkpoint']} {report['settings']['size']}x{report['settings']['size']} "
             f"{report['settings']['steps']} steps, queue {report['settings']['queue_size']}",
             f"{'phase':<7} {'requests':>8} {'open':>5} {'answered':>8} {'503':>5} {'wrong':>5} {'other':>5} "
             f"{'median s':>9} {'min s':>7} {'max s':>7}"]
    for row in report["rows"]:
        lines.append(f"{row['phase']:<7} {row['requests']:>8} {row.get('peak_in_flight', 0):>5} "
                     f"{row['answered']:>8} {row['refused_503']:>5} "
                     f"{row['images_not_matching_seed']:>5} {row['other']:>5} {row['median_s'] or 0:>9.3f} "
                     f"{row['min_s'] or 0:>7.3f} {row['max_s'] or 0:>7.3f}")
    memory = report.get("memory")
    if memory:
        lines.append(f"server RSS {memory['rss_after_warmup_mb']} MB after {report['settings']['warmup']} requests, "
                     f"{memory['rss_final_mb']} MB after {report['settings']['soak']}: "
                     f"{memory['growth_pct']:+.2f}%")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    defaults = LoadSettings()
    parser = argparse.ArgumentParser(prog="python -m sdaccel webui loadtest", description=__doc__.split("\n\n")[0])
    for name, value in asdict(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--json", default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    settings = LoadSettings(**{name: getattr(args, name) for name in asdict(defaults)})
    try:
        settings.check()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = run_loadtest(settings)
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0
