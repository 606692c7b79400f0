"""The line of a stored error that names it: the SQL function ``pgqueue.error_line`` and
the Python one the worker's log and ``pgqueue jobs`` use give the same line, on tracebacks
Python formats itself (chained, grouped, with messages of several lines)."""

from __future__ import annotations

import traceback
from collections.abc import Callable

import anyio
import pytest
from sqlharness import Connect

from pgqueue.error_line import error_line
from pgqueue.worker import executor


def _traceback(raiser: Callable[[], object]) -> str:
    try:
        raiser()
    except BaseException as exc:  # formatted as the worker formats it
        return "".join(traceback.format_exception(exc)).rstrip()
    raise AssertionError("did not raise")


def _raise(exc: Exception) -> None:
    raise exc


class ValidationError(ValueError):
    """A message as pydantic writes one: indented lines after its first."""


class ProgrammingError(Exception):
    """A message as SQLAlchemy writes one: SQL, a caret, a link after its first line."""


def _pydantic() -> None:
    raise ValidationError(
        "1 validation error for Order\norder_id\n  Field required [type=missing]\n"
        "    For further information visit https://errors.pydantic.dev/2.13/v/missing"
    )


def _sqlalchemy() -> None:
    try:
        raise LookupError('relation "t" does not exist\nLINE 1: select * from t\n    ^')
    except LookupError as exc:
        raise ProgrammingError(
            '(psycopg.errors.UndefinedTable) relation "t" does not exist\n'
            "LINE 1: select * from t\n                      ^\n[SQL: select * from t]\n"
            "(Background on this error at: https://sqlalche.me/e/21/f405)"
        ) from exc


def _raised_leaf() -> None:
    try:
        raise KeyError("k")
    except KeyError as exc:
        leaf = exc
    raise ExceptionGroup("unhandled errors in a TaskGroup", [ValueError("first"), leaf])


def _noted() -> None:
    exc = ValueError("expected 4 columns,\ngot 2")
    exc.add_note("while reading factors.csv\n  line 7")
    raise exc


# fmt: off
def _plus() -> int:
    return (  # black's style: the operator starts the line Python 3.11 shows in the frame
        1
        + {"rate": 1}["missing rate"]
    )
# fmt: on


def _plus_after_a_handled_error() -> None:
    try:
        raise ConnectionError("first, handled")
    except ConnectionError:
        _plus()


def _cut() -> str:
    """A traceback past the 64 KiB the worker keeps, cut as the worker cuts it."""
    frames = "".join(
        f'  File "/srv/app/step_{i}.py", line {i}, in step_{i}\n    return step_{i + 1}(x)\n'
        for i in range(3000)
    )
    text = f"Traceback (most recent call last):\n{frames}RecursionError: too deep\nand more"
    return executor._storable(text)


def _recursion() -> None:
    def down(n: int) -> int:
        return down(n + 1)

    down(0)


CASES = [
    (_traceback(lambda: 1 / 0), "ZeroDivisionError: division by zero"),
    (_traceback(_pydantic), "test_error_line.ValidationError: 1 validation error for Order"),
    (
        _traceback(_sqlalchemy),
        'test_error_line.ProgrammingError: (psycopg.errors.UndefinedTable) relation "t" does'
        " not exist",
    ),
    # a task group's leaf raised nowhere (no traceback of its own), and one raised
    (
        _traceback(lambda: (_ for _ in ()).throw(ExceptionGroup("g", [ValueError("boom")]))),
        "ValueError: boom",
    ),
    (_traceback(_raised_leaf), "KeyError: 'k'"),
    (
        _traceback(
            lambda: (_ for _ in ()).throw(
                ExceptionGroup("outer", [ExceptionGroup("inner", [TypeError("deep")]), OSError()])
            )
        ),
        "OSError",
    ),
    # past 15 leaves Python writes "and 5 more exceptions": the 15th is the last shown
    (
        _traceback(
            lambda: (_ for _ in ()).throw(ExceptionGroup("g", [ValueError(i) for i in range(20)]))
        ),
        "ValueError: 14",
    ),
    (_traceback(lambda: compile("1 +", "<x>", "exec")), "SyntaxError: invalid syntax"),
    (_traceback(_noted), "ValueError: expected 4 columns,"),
    (_traceback(_recursion), "RecursionError: maximum recursion depth exceeded"),
    # From the review: a frame line starting with "+" ended the frames (the first header's
    # line was taken, or a handled exception's), and the worker's cut mark was taken.
    (_traceback(_plus), "KeyError: 'missing rate'"),
    (_traceback(_plus_after_a_handled_error), "KeyError: 'missing rate'"),
    (_cut(), "RecursionError: too deep"),
    (_traceback(lambda: _raise(ValueError("HTTP 502\r\nBad gateway"))), "ValueError: HTTP 502"),
    ("mailbox full\r\nretry later", "mailbox full"),
    # the worker's own, when formatting a traceback failed
    (
        "Traceback (most recent call last; without its details: formatting it raised"
        ' SystemError: x):\n  File "a.py", line 1, in f\n    g()\nValueError: v',
        "ValueError: v",
    ),
    # not a traceback: the first line
    (
        "could not record the result: unsupported Unicode escape sequence\nDETAIL:  \\u0000"
        " cannot be converted to text.",
        "could not record the result: unsupported Unicode escape sequence",
    ),
    ("\ntimed out after 1s\n(the handler ignored its cancellation)", "timed out after 1s"),
    ("", ""),
]


@pytest.mark.parametrize(("error", "line"), CASES)
async def test_the_sql_and_the_python_error_line_name_an_error_alike(
    connect: Connect, error: str, line: str
) -> None:
    conn = await connect()
    assert error_line(error) == line
    assert await conn.fetchval("SELECT pgqueue.error_line($1)", error) == line


async def test_lines_that_lead_nowhere_are_read_once(connect: Connect) -> None:
    """A header followed by leaf lines and no exception line (a handler's message holding a
    traceback cut short) took Python's regex engine 2^n steps for n lines: 40 lines stalled
    the worker's event loop for days. Each line can be read one way only now."""
    conn = await connect()
    error = "Traceback (most recent call last):\n" + "  |   x\n" * 40 + "  |   y"
    with anyio.fail_after(5):  # not a timing: the old pattern did not end at all
        line = await anyio.to_thread.run_sync(error_line, error, abandon_on_cancel=True)
    assert line == "Traceback (most recent call last):"
    assert await conn.fetchval("SELECT pgqueue.error_line($1)", error) == line


async def test_a_long_error_is_read_in_time_and_a_null_is_null(connect: Connect) -> None:
    """The worker keeps 64 KiB of an error; a traceback of 2,000 frames is read at once."""
    conn = await connect()
    frames = "".join(f'  File "m.py", line {i}, in f\n    f()\n' for i in range(2000))
    error = f"Traceback (most recent call last):\n{frames}RecursionError: too deep\nmore"
    assert error_line(error) == "RecursionError: too deep"
    await conn.execute("SET statement_timeout = '2s'")
    assert await conn.fetchval("SELECT pgqueue.error_line($1)", error) == "RecursionError: too deep"
    assert await conn.fetchval("SELECT pgqueue.error_line(NULL)") is None
