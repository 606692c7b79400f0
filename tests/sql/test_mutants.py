"""Every race test named in mutants.py fails against its broken function."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mutants import MUTANTS

HERE = Path(__file__).parent


@pytest.mark.skipif(
    bool(os.environ.get("PGQUEUE_SQL_MUTANT")), reason="already inside a mutant run"
)
@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_race_test_kills_mutant(name: str) -> None:
    mutant = MUTANTS[name]
    env = {**os.environ, "PGQUEUE_SQL_MUTANT": name}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
            "--timeout",
            "60",
            str(HERE / mutant.killed_by),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    tail = "\n".join(proc.stdout.splitlines()[-5:])
    assert proc.returncode == 1, (
        f"mutant {name} survived {mutant.killed_by} (exit {proc.returncode}):\n{tail}"
    )
    # Killed by the test's assertions, not by an error setting the mutant up (its text not
    # found in the function, a definition that does not compile): that would kill anything.
    summary = proc.stdout.splitlines()[-1]
    assert "1 failed" in summary and "error" not in summary, (
        f"mutant {name}: {mutant.killed_by} did not fail on the mutant itself:\n{tail}"
    )
