"""The A1111 API under a burst, over loopback, against a real `python -m sdaccel webui --api-only` process:
all 50 requests opened at once from 10 clients (5 in flight each), every one answered with the image its seed
gives, or refused cleanly with 503 and Retry-After when the queue is full.
(Latency and memory over a 300-request soak are measured by `python -m sdaccel webui loadtest`, not asserted.)
"""

from __future__ import annotations

import pytest

pytest.importorskip("uvicorn")

from sdaccel.optim.spec.errors import ConfigError  # noqa: E402
from sdaccel.webui.loadtest import LoadSettings, run_loadtest  # noqa: E402


def test_fifty_concurrent_requests_from_ten_clients_are_answered_or_refused_cleanly(tmp_path):
    settings = LoadSettings(burst=50, clients=10, soak=0, queue_size=8, seeds=5)
    report = run_loadtest(settings, say=lambda _: None, log_path=tmp_path / "server.log")
    burst = report["rows"][0]
    assert burst["requests"] == 50 and burst["other"] == 0, (burst, (tmp_path / "server.log").read_text()[-3000:])
    # more open at once than there are clients: the clients do not send one request after another
    assert burst["peak_in_flight"] > settings.clients, burst
    assert burst["answered"] + burst["refused_503"] == 50  # a 503 counts only with its Retry-After header
    assert burst["answered"] >= settings.queue_size  # the queue's worth always gets through
    assert burst["refused_503"] > 0  # 50 at once overflow a queue of 8: refusals are what is tested here
    assert burst["images_not_matching_seed"] == 0, burst


def test_the_soak_runs_every_client_so_its_queue_must_hold_one_request_of_each():
    LoadSettings(clients=10, queue_size=10).check()
    LoadSettings(clients=10, queue_size=8, soak=0).check()  # a burst alone may overflow the queue
    with pytest.raises(ConfigError, match="queue_size: 8 is below the 10 soak clients.*--queue-size >= --clients"):
        LoadSettings(clients=10, queue_size=8).check()
    assert LoadSettings().queue_size >= LoadSettings().clients
