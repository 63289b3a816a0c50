"""`python -m sdaccel webui`: the SDAccel web UI and the A1111 API on one port, on 127.0.0.1 by default."""

from __future__ import annotations

import argparse
import logging
import sys

from ..optim.bench.processes import LOOPBACK
from ..optim.spec.errors import SDAccelError

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    from ..optim.spec.model_ref import FAMILY_CHOICES
    from .service import DEFAULT_QUEUE_SIZE

    parser = argparse.ArgumentParser(prog="python -m sdaccel webui", description="SDAccel's web UI and an "
                                     "A1111-compatible HTTP API (/sdapi/v1/...) on the same engine. "
                                     "`python -m sdaccel webui loadtest --help`: the API under load, measured.")
    parser.add_argument("--models", action="append", default=[], metavar="DIR",
                        help="folder of checkpoints (.safetensors/.ckpt files, diffusers folders); repeatable. "
                        "Default: ./models/Stable-diffusion when it exists")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="PATH",
                        help="a checkpoint outside the models folders (or synthetic:<family>); the first one given "
                        "is selected at start")
    parser.add_argument("--loras", action="append", default=[], metavar="DIR",
                        help="folder of LoRA files for the prompt's <lora:name:strength> tags (repeatable; default: "
                        "a Lora folder beside each models folder, as A1111 lays them out)")
    parser.add_argument("--family", default="auto", choices=FAMILY_CHOICES, help="family override for every model")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--listen", nargs="?", const="0.0.0.0", default=None, metavar="ADDRESS",
                        help="serve on another address than 127.0.0.1 (0.0.0.0 when given alone): anyone who can "
                        "reach it can generate on this machine")
    parser.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE,
                        help="generations that may wait; more get HTTP 503")
    parser.add_argument("--api-only", action="store_true", help="serve the API without the gradio UI")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv=None) -> int:
    from pathlib import Path

    from .catalog import ModelCatalog
    from .server import serve
    from .session import WebSession

    argv = list(argv) if argv is not None else sys.argv[1:]
    if argv[:1] == ["loadtest"]:
        from .loadtest import main as loadtest_main

        return loadtest_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    folders = args.models or ([Path("models/Stable-diffusion")] if Path("models/Stable-diffusion").is_dir() else [])
    host = args.listen or LOOPBACK
    if host != LOOPBACK:
        log.warning("serving on %s: anyone who can reach this address can run generations on this machine", host)
    if args.queue_size < 1:
        print("error: --queue-size must be at least 1", file=sys.stderr)
        return 2
    try:
        from ..optim.run.allocator import keep_freed_memory
        from ..optim.testing import enable_synthetic

        keep_freed_memory()  # our own process: reuse freed memory (see optim/run/allocator.py); a host's is its own
        enable_synthetic()  # synthetic:<family> checkpoints (random weights) for trying the UI without a model
        loras = args.loras or [Path(folder).expanduser().parent / "Lora" for folder in folders]
        session = WebSession(ModelCatalog(folders, args.checkpoint), family=args.family, device=args.device,
                             queue_size=args.queue_size, lora_folders=loras,
                             checkpoint=ModelCatalog.extra_title(args.checkpoint[0]) if args.checkpoint else None)
        serve(session, host=host, port=args.port, ui=not args.api_only)
    except SDAccelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"error: the web UI needs gradio and uvicorn ({exc}); install them with "
              "pip install 'sdaccel[gradio]' (or pip install gradio)", file=sys.stderr)
        return 2
    return 0
