"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-12-01

Frozen: applies 0001_initial.up.sql / 0001_initial.down.sql beside this script
and never reads sql/. While 0001 is unreleased, scripts/freeze_initial.py
regenerates the up SQL from sql/; once released, nothing here is ever edited.
"""

from __future__ import annotations

from pathlib import Path

from pgqueue.migrate import apply_sql_file

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

_BASE = Path(__file__).with_suffix("")


def upgrade() -> None:
    apply_sql_file(_BASE.with_name(_BASE.name + ".up.sql"))


def downgrade() -> None:
    apply_sql_file(_BASE.with_name(_BASE.name + ".down.sql"))
