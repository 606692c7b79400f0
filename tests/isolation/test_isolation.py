"""Race specs run by PostgreSQL's own isolationtester.

Each ``specs/NAME.spec`` runs against a fresh migrated database and its output
must equal ``expected/NAME.out`` byte for byte (a unified diff is printed on a
mismatch). isolationtester ships with the PostgreSQL client (Debian:
``postgresql-client-NN``, under ``lib/pgxs/src/test/isolation/``); set
``PGQUEUE_ISOLATIONTESTER`` to point at another copy. Without one these tests
skip; the asyncpg race tests in ``tests/sql`` cover the same guarantees.

To regenerate an expected file after an intended change, run the spec by hand
against a freshly migrated database and read the output before accepting it::

    isolationtester "dbname=..." < tests/isolation/specs/NAME.spec > tests/isolation/expected/NAME.out
"""

from __future__ import annotations

import difflib
import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent
SPECS = sorted((HERE / "specs").glob("*.spec"))
RELATIVE = Path("pgxs/src/test/isolation/isolationtester")
# Seconds a step may stay blocked before isolationtester gives up (its own default is 300).
STEP_TIMEOUT = "60"


def find_isolationtester() -> tuple[str | None, str]:
    """Path of an isolationtester binary, or None and the places looked at."""
    looked: list[str] = []
    env = os.environ.get("PGQUEUE_ISOLATIONTESTER")
    if env:
        if os.access(env, os.X_OK):
            return env, ""
        looked.append(f"PGQUEUE_ISOLATIONTESTER={env}")
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--pkglibdir"], capture_output=True, text=True, check=True, timeout=10
            )
            candidates.append(Path(out.stdout.strip()) / RELATIVE)
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += [
        Path(p) / RELATIVE for p in sorted(glob.glob("/usr/lib/postgresql/*/lib"), reverse=True)
    ]
    for candidate in candidates:
        looked.append(str(candidate))
        if os.access(candidate, os.X_OK):
            return str(candidate), ""
    return None, ", ".join(looked) or "no pg_config on PATH and no /usr/lib/postgresql/*/lib"


ISOLATIONTESTER, LOOKED = find_isolationtester()

pytestmark = pytest.mark.skipif(
    ISOLATIONTESTER is None,
    reason=(
        "PostgreSQL's isolationtester not found (install postgresql-client or set "
        f"PGQUEUE_ISOLATIONTESTER); looked at: {LOOKED}"
    ),
)


def test_every_spec_has_expected_output() -> None:
    assert SPECS, "no specs found"
    expected = {p.stem for p in (HERE / "expected").glob("*.out")}
    assert expected == {p.stem for p in SPECS}


@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
def test_spec_output_matches_expected(spec: Path, db_dsn: str) -> None:
    assert ISOLATIONTESTER is not None
    expected_file = HERE / "expected" / f"{spec.stem}.out"
    # isolationtester takes a libpq conninfo string; a postgresql:// URI is one.
    proc = subprocess.run(
        [ISOLATIONTESTER, db_dsn],
        input=spec.read_bytes(),
        capture_output=True,
        timeout=110,
        check=False,
        env={**os.environ, "PGISOLATIONTIMEOUT": STEP_TIMEOUT},
    )
    output = proc.stdout.decode()
    assert proc.returncode == 0, (
        f"isolationtester exited {proc.returncode}\nstderr:\n{proc.stderr.decode()}\n"
        f"stdout:\n{output}"
    )
    expected = expected_file.read_text()
    if output != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                output.splitlines(keepends=True),
                fromfile=str(expected_file.relative_to(HERE.parent.parent)),
                tofile=f"actual output of {spec.name}",
            )
        )
        print(diff)
        pytest.fail(f"{spec.name}: output differs from {expected_file.name}:\n{diff}")
