"""spnet ui: the MLflow UI on 127.0.0.1 against the tracking store."""
from __future__ import annotations

import argparse

NAME = "ui"
HELP = "start the MLflow UI on 127.0.0.1 against the tracking store"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--uri", default="sqlite:///mlflow.db")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)


def run(args: argparse.Namespace) -> int:
    from ..tracking.ui import serve

    return serve(args.uri, host=args.host, port=args.port)
