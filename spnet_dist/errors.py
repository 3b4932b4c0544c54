"""Errors that end a run with one clear message (the CLI prints them as one line and exits with code 2)."""


class SpnetError(RuntimeError):
    """A stop the user can act on: the message names what is wrong and what to do."""


class ConfigError(ValueError):
    """A bad config key or value; the message names the key, the bad value and what would be right."""


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again" — a checkpoint was written; resume=auto continues
EXIT_RANK_LOST = 76  # this rank ended because another rank died or stopped answering (the cause is that rank)


class RankLostExit(SystemExit):
    """This rank ends because another rank died or stopped answering: exit code ``EXIT_RANK_LOST`` (76), no
    traceback. ``diagnosis`` names the lost ranks (``engine.heartbeat``)."""

    def __init__(self, code: int, diagnosis: dict) -> None:
        super().__init__(code)
        self.diagnosis = diagnosis


# What the CLI reports as one line (exit code 2) instead of a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, SpnetError)


def setup_logging(rank: int) -> None:
    """INFO on rank 0, WARNING elsewhere; the libraries' chatter at WARNING."""
    import logging
    import sys

    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "mlflow", "alembic", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
