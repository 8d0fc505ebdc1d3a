"""One logger for the run's messages, on rank 0 only: information on stdout, warnings and errors on
stderr, written through tqdm so that they never tear the progress bar. Other ranks log nothing (the
ranks' own warnings that matter, such as a corrupt file met in a worker, are printed where they
happen)."""
from __future__ import annotations

import logging
import sys

from tqdm import tqdm

logger = logging.getLogger("trainer")


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        tqdm.write(self.format(record), file=stream)
        stream.flush()


def setup_logging(is_main: bool) -> None:
    """Called once per run, when the rank is known."""
    logger.handlers = [_TqdmHandler()] if is_main else [logging.NullHandler()]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def info(message: str) -> None:
    logger.info(message)


def warning(message: str) -> None:
    logger.warning(f"warning: {message}")


def error(message: str) -> None:
    logger.error(message)
