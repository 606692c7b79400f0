"""pgqueue's connections decode json/jsonb with the JSON scanner directly (see
``pgqueue.dsn.loads``); what they return and raise must be exactly what ``json.loads`` does."""

from __future__ import annotations

import json

import pytest
from sqlharness import Connect

from pgqueue.dsn import init_connection, loads

# json keeps the text as written (whitespace included); jsonb prints its own form.
VALUES = """
SELECT v::text AS text, v AS decoded FROM (VALUES
    (' {"a": [1, 2.5, null, true]} '::json), ('"x"'::json), ('  3'::json), ('null'::json),
    ('{"é": "\\u00e9", "n": {"m": [[]]}}'::json), ('{"big": 123456789012345678901234567890}'::json)
) t(v)
UNION ALL
SELECT v::text, v::json FROM (VALUES ('{"b": {"c": [1, "two", false]}}'::jsonb), ('[]'::jsonb)) t(v)
"""


async def test_decoded_values_are_what_json_loads_makes_of_the_text(connect: Connect) -> None:
    conn = await connect()
    await init_connection(conn)
    rows = await conn.fetch(VALUES)
    assert len(rows) == 8
    for row in rows:
        assert row["decoded"] == json.loads(row["text"]), row["text"]


@pytest.mark.parametrize("text", ["{bad", "", '{"a": 1} x', "[1,]"])
def test_invalid_text_raises_as_json_loads_does(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(json.JSONDecodeError) as got:
        loads(text)
    assert str(got.value) == str(expected.value)
