"""SQL tests: optionally run against a deliberately broken function (see mutants.py)."""

from __future__ import annotations

import os

import asyncpg
import pytest
from mutants import apply


@pytest.fixture
def db_dsn(db_dsn: str) -> str:
    name = os.environ.get("PGQUEUE_SQL_MUTANT")
    if name:
        import asyncio
        import threading

        async def mutate() -> None:
            conn = await asyncpg.connect(db_dsn)
            try:
                await apply(conn, name)
            finally:
                await conn.close()

        thread = threading.Thread(target=lambda: asyncio.run(mutate()))
        thread.start()
        thread.join()
    return db_dsn
