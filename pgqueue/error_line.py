"""The one line of a stored error that says what went wrong.

``last_error`` holds a handler's whole traceback, or a message of the worker's own. The
worker's log line, ``pgqueue jobs`` and the cookbook's grouping of failed jobs show one
line of it: for a traceback, the exception's (its type and the first line of its message).
That is the first unindented line after the last traceback header or exception-group leaf
marker, past the frames (``File ...``, their source and caret lines, all indented). Not the
text's last line: a message of several lines (pydantic's, SQLAlchemy's ``[SQL: ...]`` and
``(Background on this error ...)``), notes and a chained exception follow it. The SQL
function ``pgqueue.error_line`` uses :data:`PATTERN` too, so psql and the worker name a
failure alike.
"""

from __future__ import annotations

import re

# A POSIX-style regular expression both Python and PostgreSQL read the same way: a greedy
# start that reaches the last header (``Traceback (most recent call last):``, the worker's
# ``Traceback (most recent call last; without its details ...)``, an exception group's, or a
# numbered leaf marker ``+---------------- 2 ----------------``); the lines after it that
# are not the exception's: indented ones (frames, their source, even one starting with
# ``+``, and carets), an exception group's leaf lines indented past its ``|``, and the
# worker's mark of a cut (``[... N bytes cut ...]``, see executor._storable); then the line
# captured, without a trailing carriage return. Each line can be read one way only: Python's
# backtracking engine, given a choice per line, took 2^n steps on n such lines that led
# nowhere (a handler's message holding a cut-off traceback stalled the worker's loop).
PATTERN = (
    r"^.*(?:Traceback \(most recent call last[^\n]*|\+-*\+?-+ [0-9]+ -+)\n"
    r"(?:[ ]*\|[ ][ ][^\n]*\n|[ ]+[^ |\n][^\n]*\n|\[\.\.\. [0-9]+ bytes cut \.\.\.\]\n)*"
    r"(?:[ ]*\|[ ])?([^ \n|+[][^\n\r]*)"
)
_PATTERN = re.compile(PATTERN, re.DOTALL)


def error_line(error: str, limit: int = 300) -> str:
    """The line of ``error`` that names it, cut to ``limit`` characters: a traceback's
    exception line (of its last leaf, for an exception group), else its first line (after
    any blank ones). ``pgqueue.error_line(text)`` in SQL is the same function."""
    found = _PATTERN.match(error)
    line = found.group(1) if found else error.lstrip("\n").partition("\n")[0].rstrip("\r")
    return line if len(line) <= limit else line[: limit - 3] + "..."
