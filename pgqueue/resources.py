"""Locate the SQL and migration files shipped with pgqueue.

An installed wheel carries them inside the package (``pgqueue/_sql`` and
``pgqueue/_migrations``, put there by hatch's force-include); a checkout or an
editable install reads them from the repository root (``sql/`` and ``migrations/``).
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def _locate(packaged: str, checkout: str) -> Path:
    for candidate in (_PACKAGE_DIR / packaged, _PACKAGE_DIR.parent / checkout):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"pgqueue cannot find its {checkout}/ directory "
        f"(looked in {_PACKAGE_DIR / packaged} and {_PACKAGE_DIR.parent / checkout})"
    )


def sql_dir() -> Path:
    """The directory holding the SQL source of truth (``*.sql``, applied in name order)."""
    return _locate("_sql", "sql")


def migrations_dir() -> Path:
    """The Alembic script directory (``env.py``, ``versions/``)."""
    return _locate("_migrations", "migrations")
