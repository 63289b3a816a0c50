"""`python -m sdaccel`: the command-line front-ends. `webui` starts the web UI and A1111 API (webui/cli.py);
everything else is the engine's CLI (optim/cli.py). Kept apart so the engine never imports gradio."""

import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["webui"]:
        from .webui.cli import main as webui_main

        return webui_main(argv[1:])
    from .optim.cli import main as engine_main

    return engine_main(argv)


if __name__ == "__main__":
    sys.exit(main())
