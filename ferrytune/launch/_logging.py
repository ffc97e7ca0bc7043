"""Logging set-up shared by every entry point (the CLI, torchrun ranks, Ray workers, the service)."""

from __future__ import annotations

import logging

NOISY = ("transformers", "urllib3", "filelock", "numba")


def setup_logging(debug: bool) -> None:
    """One line per record (time, level, logger); third-party chatter at WARNING unless ``debug``."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not debug:
        for noisy in NOISY:
            logging.getLogger(noisy).setLevel(logging.WARNING)
