"""`python -m sdaccel webui`'s address: 127.0.0.1 unless `--listen` says otherwise, and then with a warning. The
address is read where uvicorn receives it (uvicorn.run replaced), so no server is started."""

from __future__ import annotations

import logging

import pytest

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from sdaccel.webui.cli import main  # noqa: E402


@pytest.fixture
def bound(monkeypatch):
    """Run main(argv) with uvicorn.run recording its host and port instead of serving."""
    calls: list[dict] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))

    def run(tmp_path, *argv) -> dict:
        assert main(["--api-only", "--models", str(tmp_path), "--port", "7999", *argv]) == 0
        assert len(calls) == 1
        return calls.pop()

    return run


def test_the_server_binds_loopback_by_default(bound, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="sdaccel.webui.cli"):
        kwargs = bound(tmp_path)
    assert (kwargs["host"], kwargs["port"]) == ("127.0.0.1", 7999)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


@pytest.mark.parametrize("argv, host", [(["--listen"], "0.0.0.0"), (["--listen", "192.168.1.5"], "192.168.1.5")])
def test_listen_changes_the_address_with_a_warning(bound, tmp_path, caplog, argv, host):
    with caplog.at_level(logging.WARNING, logger="sdaccel.webui.cli"):
        kwargs = bound(tmp_path, *argv)
    assert kwargs["host"] == host
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"serving on {host}: anyone who can reach this address" in warnings[0], warnings
