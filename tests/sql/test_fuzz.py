"""Randomised concurrency fuzzing of the SQL API (see fuzz_driver.py for what it checks).

By default a short run of fixed seeds, part of the normal suite. Longer or other runs:

    PGQUEUE_FUZZ_SECONDS=120 PGQUEUE_FUZZ_SEED=1234 pytest tests/sql/test_fuzz.py --timeout 0

A failure names its seed; the same seed replays the same random choices (the interleaving
is the server's, so a rare race may need a few runs, or a longer one, to come back).
"""

from __future__ import annotations

import os

import pytest
from fuzz_driver import Connect, Fuzzer

SEEDS = [int(os.environ["PGQUEUE_FUZZ_SEED"])] if os.environ.get("PGQUEUE_FUZZ_SEED") else [1, 2]
SECONDS = float(os.environ.get("PGQUEUE_FUZZ_SECONDS", "10"))


@pytest.mark.parametrize("seed", SEEDS)
async def test_fuzz(connect: Connect, seed: int) -> None:
    fuzzer = Fuzzer(connect, seed=seed, seconds=SECONDS)
    failure: AssertionError | None = None
    try:
        summary = await fuzzer.run()
    except AssertionError as exc:
        failure = exc
    if failure is not None:
        pytest.fail(
            f"{failure}\nreproduce: PGQUEUE_FUZZ_SEED={seed} PGQUEUE_FUZZ_SECONDS={SECONDS:g}"
            f" pytest tests/sql/test_fuzz.py\n{fuzzer.stats.summary()}",
            pytrace=False,
        )
    print(summary)
    for example in fuzzer.stats.deadlock_examples:
        print("  documented deadlock:", example)
