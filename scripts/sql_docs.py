#!/usr/bin/env python3
"""Run a page's psql examples in order and compare (or rewrite) the outputs it shows.

docs/sql.md and docs/cookbook.md promise that their ``sql`` blocks, pasted into psql in order
in a freshly migrated database, print the ``text`` block that follows each (job ids included).
This script holds a page to that: it feeds all blocks to one psql session and compares each
output with the page.

    python scripts/sql_docs.py DSN                            # docs/sql.md; exit 1 on a difference
    python scripts/sql_docs.py DSN --page docs/cookbook.md    # another page
    python scripts/sql_docs.py DSN --write                    # rewrite the outputs on the page

DSN names a freshly migrated, otherwise empty database (the test suite passes a clone of its
migrated template). Only ``ERROR:`` lines of an error are kept (psql's ``CONTEXT``/``DETAIL``
follow-ups are dropped, as on the page) and notification PIDs are shown as 4242.
"""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = (ROOT / "docs" / "sql.md", ROOT / "docs" / "cookbook.md")
EXAMPLE = re.compile(r"```sql\n(.*?)```(\n\n```text\n(.*?)```)?", re.S)
FOLLOW_UPS = ("CONTEXT:", "DETAIL:", "HINT:", "LINE ")
FOLLOW_UP_BODY = ("PL/pgSQL function", "SQL statement", "SQL function")


def run_examples(dsn: str, psql: str, blocks: list[str]) -> list[str]:
    """Each block's psql output (stdout and stderr interleaved), in one session."""
    script = "".join(f"\\echo ===BLOCK {i}===\n{block}\n" for i, block in enumerate(blocks))
    out = subprocess.run(
        [psql, "-X", "--no-psqlrc", dsn],
        input=script,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    ).stdout
    parts = re.split(r"===BLOCK (\d+)===\n", out)
    found = {int(parts[k]): parts[k + 1] for k in range(1, len(parts), 2)}
    return [clean(found.get(i, "")) for i in range(len(blocks))]


def clean(output: str) -> str:
    lines: list[str] = []
    in_follow_up = False
    in_statement = False  # inside a CONTEXT's quoted, multi-line "SQL statement" text
    for line in output.splitlines():
        if in_statement:
            in_statement = not line.endswith('"')
            continue
        if line.startswith(FOLLOW_UPS):
            in_follow_up = True
            in_statement = _opens_statement(line.removeprefix("CONTEXT:  "))
            continue
        if in_follow_up and (
            line.startswith(FOLLOW_UP_BODY) or line.startswith(" " * 8) or re.match(r"\s+\^$", line)
        ):
            in_statement = _opens_statement(line)
            continue
        in_follow_up = False
        line = re.sub(r"server process with PID \d+", "server process with PID 4242", line)
        lines.append(line.rstrip())
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n"


def _opens_statement(line: str) -> bool:
    """A CONTEXT line quoting a statement whose text goes on over the next lines."""
    return line.startswith('SQL statement "') and not line.endswith('"')


def compare(page: Path, dsn: str, psql: str, write: bool) -> list[str]:
    """Run the page's examples; return a diff per differing output (rewrite them if asked)."""
    text = page.read_text()
    examples = list(EXAMPLE.finditer(text))
    outputs = run_examples(dsn, psql, [m.group(1) for m in examples])
    diffs: list[str] = []
    pieces: list[str] = []
    last = 0
    for m, got in zip(examples, outputs, strict=True):
        if m.group(2) is None:  # an example shown without output
            continue
        if got != m.group(3):
            line = text.count("\n", 0, m.start(3)) + 1
            diff = difflib.unified_diff(
                m.group(3).splitlines(), got.splitlines(), "page", "psql", lineterm="", n=1
            )
            diffs.append(f"{page.relative_to(ROOT)}:{line}:\n" + "\n".join(diff))
        pieces += [text[last : m.start(3)], got]
        last = m.end(3)
    if write and diffs:
        page.write_text("".join(pieces) + text[last:])
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dsn", help="a freshly migrated, empty database")
    parser.add_argument("--page", type=Path, default=PAGES[0], help="default: docs/sql.md")
    parser.add_argument("--write", action="store_true", help="rewrite the outputs on the page")
    parser.add_argument("--psql", default=shutil.which("psql") or "psql")
    args = parser.parse_args()
    diffs = compare(args.page.resolve(), args.dsn, args.psql, args.write)
    for d in diffs[:5]:
        print(d, file=sys.stderr)
    if diffs and not args.write:
        sys.exit(1)
    print(f"{len(diffs)} output(s) {'rewritten' if args.write else 'differ'}")


if __name__ == "__main__":
    main()
