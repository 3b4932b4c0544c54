"""spnet ui: the MLflow UI on 127.0.0.1 against the configured tracking store (Ctrl-C stops it)."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--uri", default=None, help="tracking store (default: tracking.uri, e.g. sqlite:///mlflow.db)")
    p.add_argument("--host", default=None, help="address to listen on (default: tracking.ui.host = 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: tracking.ui.port = 5000)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. tracking.uri=sqlite:///other.db")


def run(args: argparse.Namespace) -> int:
    import signal

    from ..config import compose

    # Ctrl-C stops the UI even when started from a shell that ignores SIGINT (a background `&` job inherits that)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from ..tracking.ui import serve

    from ..tracking.ui import check_port

    cfg = compose(args.overrides)
    ui = cfg.tracking.get("ui") or {}
    # the port first: a bad one is one line (exit 2), not socket's OverflowError
    port = check_port(args.port) if args.port is not None else check_port(ui.get("port", 5000), "tracking.ui.port")
    return serve(args.uri or str(cfg.tracking.uri), host=args.host or str(ui.get("host", "127.0.0.1")), port=port)
