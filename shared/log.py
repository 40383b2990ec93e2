"""Logging set-up shared by every entry point: one format, rich output on a terminal, plain in files/CI."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str | int | None = None) -> None:
    """Configure the root logger once. Level from the argument, else ``$SELFALIGN_LOG_LEVEL``, else INFO."""
    level = level or os.environ.get("SELFALIGN_LOG_LEVEL", "INFO")
    if isinstance(level, str):
        level = level.upper()
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, rich_tracebacks=True)
        fmt = "%(name)s: %(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # Chatty libraries stay at WARNING unless asked.
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
