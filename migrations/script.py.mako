"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

Frozen: applies the SQL files beside this script and never reads sql/.
Once released, neither this script nor its SQL files are ever edited.
"""

from __future__ import annotations

from pathlib import Path

from pgqueue.migrate import apply_sql_file

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}

_BASE = Path(__file__).with_suffix("")


def upgrade() -> None:
    apply_sql_file(_BASE.with_name(_BASE.name + ".up.sql"))


def downgrade() -> None:
    apply_sql_file(_BASE.with_name(_BASE.name + ".down.sql"))
