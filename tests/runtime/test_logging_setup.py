"""configure_logging (``pgqueue worker``'s logging) in one process, as a CLI test of an app's
worker command runs it: what counts as the application's own logging, and the level."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import pytest

from pgqueue.worker import logs


@contextlib.contextmanager
def isolated() -> Iterator[tuple[logging.Logger, logging.Logger]]:
    """The root and pgqueue loggers with no handlers (pytest's own capture handlers, added
    for each phase of a test, included), put back as they were afterwards."""
    root, ours = logging.getLogger(), logging.getLogger("pgqueue")
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in (root, ours)]
    root.handlers[:], ours.handlers[:] = [], []
    ours.setLevel(logging.NOTSET)
    try:
        yield root, ours
    finally:
        for lg, handlers, level, propagate in saved:
            lg.handlers[:], lg.propagate = handlers, propagate
            lg.setLevel(level)


def test_a_second_run_in_one_process_installs_its_handler_again() -> None:
    """From a review: the handler of the first run counted as "the app configured logging",
    so the second logged through a handler bound to the first run's stream (nothing)."""
    with isolated() as (_root, ours):
        logs.configure_logging(None, None)
        first = ours.handlers[:]
        logs.configure_logging(None, None)
        assert len(ours.handlers) == 1 and ours.handlers != first and not ours.propagate


def test_a_null_handler_is_no_logging_configured() -> None:
    """From a review: a NullHandler on the root (a library's habit) silenced every line."""
    with isolated() as (root, ours):
        root.addHandler(logging.NullHandler())
        logs.configure_logging(None, None)
        assert len(ours.handlers) == 1 and not ours.propagate


def test_the_apps_handlers_after_an_earlier_run_get_the_lines() -> None:
    with isolated() as (root, ours):
        logs.configure_logging(None, None)  # a first run, no app logging: ours, not propagating
        root.addHandler(logging.StreamHandler())  # the app configures logging
        logs.configure_logging(None, None)
        assert ours.handlers == [] and ours.propagate


@pytest.mark.parametrize("configured", [False, True])
def test_a_level_the_app_set_stands_unless_one_is_given(configured: bool) -> None:
    """From a review: with no handler of the app's, the level it set was overridden by INFO,
    as the --log-level help says it is not."""
    with isolated() as (root, ours):
        if configured:
            root.addHandler(logging.StreamHandler())
        ours.setLevel(logging.WARNING)
        logs.configure_logging(None, None)
        assert ours.level == logging.WARNING
        logs.configure_logging(None, logging.DEBUG)
        assert ours.level == logging.DEBUG
        logs.configure_logging(None, None)  # the level a run set is no app's choice
        assert ours.level == logging.INFO


def test_a_level_the_app_set_stands_in_every_run() -> None:
    """From a review: the first run kept the app's DEBUG and recorded it as its own, so the
    second took it for an earlier run's and set INFO."""
    with isolated() as (_root, ours):
        ours.setLevel(logging.DEBUG)
        logs.configure_logging(None, None)
        logs.configure_logging(None, None)
        assert ours.level == logging.DEBUG
