"""Log setup for the worker: human-readable text or one JSON object per line."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has; anything else was passed through ``extra=`` and is context.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with ``extra=`` fields (job_id, job_type, ...) as keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``%(asctime)s %(levelname)s %(name)s: %(message)s``, the timestamp's seconds part
    formatted once per second rather than once per record (a line per job adds up)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"


class BufferedStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes records to stderr through a block buffer, flushed every ``interval`` seconds.

    A line per job outcome through line-buffered ``sys.stderr`` is a ``write`` system call
    per job, about a seventh of a busy worker's CPU. Here lines collect in a buffer that a
    daemon thread flushes every ``interval`` (and logging's exit hook at shutdown);
    warnings and errors are flushed at once. A process killed with SIGKILL can lose the
    last ``interval`` of INFO lines.
    """

    def __init__(self, interval: float = 0.1) -> None:
        stream = io.TextIOWrapper(
            io.BufferedWriter(io.FileIO(sys.stderr.fileno(), "w", closefd=False), 1 << 16),
            encoding=sys.stderr.encoding,
            errors="backslashreplace",
        )
        super().__init__(stream)
        self._interval = interval
        threading.Thread(target=self._flush_forever, name="pgqueue log flush", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
            if record.levelno >= logging.WARNING:
                self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def _flush_forever(self) -> None:
        while True:
            time.sleep(self._interval)
            self.flush()


def _apps(handlers: list[logging.Handler]) -> list[logging.Handler]:
    """The handlers an application configured: not the ones pgqueue installed (an earlier
    run in this process: a CLI test's), and not NullHandlers, which print nothing."""
    return [
        h
        for h in handlers
        if not getattr(h, _OURS, False) and not isinstance(h, logging.NullHandler)
    ]


# Marks the handler configure_logging installs, and the level it set (see _apps).
_OURS = "_pgqueue_handler"
_level_set: int | None = None


def configure_logging(fmt: str | None = "text", level: int | None = None) -> None:
    """Send pgqueue's logs to stderr in the chosen format (``text`` or ``json``), at
    ``level``: when None, the level the application set on the ``pgqueue`` logger, else
    INFO.

    With no format chosen (None), an application that configured logging itself (a handler
    on the root logger or on ``pgqueue``, when its module was imported) keeps it: pgqueue's
    lines go to its handlers, in its formats, with the fields of the JSON format as record
    attributes."""
    global _level_set
    logger = logging.getLogger("pgqueue")
    # A level the application set is kept (one an earlier run set is not the app's).
    if level is not None or logger.level in (logging.NOTSET, _level_set):
        _level_set = level = logging.INFO if level is None else level
        logger.setLevel(level)
    apps = _apps(logger.handlers)
    if fmt is None and (apps or _apps(logging.getLogger().handlers)):
        if len(apps) < len(logger.handlers):  # an earlier run's, ours
            logger.handlers[:] = apps
            logger.propagate = True
        return
    handler: logging.Handler
    try:
        sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced by something without a file
        handler = logging.StreamHandler(sys.stderr)
    else:
        sys.stderr.flush()
        handler = BufferedStderrHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    setattr(handler, _OURS, True)
    # (logging's logThreads / logProcesses switches would save ~0.3 us per line, but they
    # are the process's: an application's "%(process)d" format then failed on every line.)
    logger.handlers[:] = [handler]
    logger.propagate = False
