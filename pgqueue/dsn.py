"""Where pgqueue finds its database, and how its own asyncpg connections are set up.

Every connection pgqueue opens for itself goes through :func:`connect` or :func:`create_pool`,
so the JSON codecs and the ``application_name`` are set in exactly one place. Connections
that belong to the application (passed to ``App.enqueue``) are never modified: the enqueue
statements send JSON as text and cast it in SQL, so they work with or without these codecs.
"""

from __future__ import annotations

import configparser
import datetime
import json
import json.scanner
import operator
import os
import pathlib
import re
import urllib.parse
import uuid
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any, TypeAlias, cast

import asyncpg

ENV_VAR = "PGQUEUE_DSN"
# What every public call that runs SQL takes: the caller's connection or pool, never modified.
ConnOrPool: TypeAlias = "asyncpg.Connection | asyncpg.Pool"
INT8_MAX = 2**63 - 1  # the largest job id (bigint)
INT4_MIN, INT4_MAX = -(2**31), 2**31 - 1  # the int columns' range (priority, max_running)


def resolve_dsn(dsn: str | None = None) -> str | None:
    """Return the DSN to use: the explicit one, else ``$PGQUEUE_DSN``, else ``None``.

    ``None`` is a valid answer: asyncpg (like libpq) then reads ``PGHOST``, ``PGPORT``,
    ``PGUSER``, ``PGDATABASE``, ``PGPASSWORD`` and friends from the environment, and
    pgqueue passes ``PGOPTIONS`` on (:func:`server_settings`) and ``PGSERVICE`` as a
    ``service=`` URL (:func:`service_dsn`), two variables asyncpg does not read itself.
    """
    if dsn:
        return dsn
    return os.environ.get(ENV_VAR) or None


class DsnError(ValueError):
    """A DSN asyncpg cannot use; the message names the part, never the DSN itself."""


_SESSION_HINT = (
    "; from SQLAlchemy, call its SQL function through your session"
    " (session.execute(text(...)); docs/sql.md), or hand it the asyncpg connection"
    " under an asyncpg engine's ((await conn.get_raw_connection()).driver_connection)"
)


def asyncpg_target(
    api: str,
    target: object,
    takes: str = "an asyncpg connection or pool",
    session_hint: str = _SESSION_HINT,
) -> ConnOrPool:
    """``target``, refused unless it is an asyncpg connection or pool, naming what ``api``
    ``takes`` and, for something with ``execute`` (a SQLAlchemy session, a psycopg
    connection), ``session_hint``: such a target failed deep inside with "'AsyncSession'
    object has no attribute 'fetchrow'"."""
    if not hasattr(target, "fetchval"):
        raise TypeError(
            f"{api} takes {takes}, got {type(target).__name__}"
            + (session_hint if hasattr(target, "execute") else "")
        )
    return cast("ConnOrPool", target)


def check_dsn(dsn: str | None) -> None:
    """Raise :class:`DsnError` naming what is wrong with a DSN asyncpg cannot use.

    asyncpg reports a bad port as ``invalid literal for int()`` or an ``OverflowError`` from
    deep in the socket code; the message here names the port, and never repeats the DSN,
    which may hold a password. Without a DSN, asyncpg reads ``$PGPORT``, checked alike.
    """
    if dsn is None:
        service = service_dsn()
        if service is not None:
            check_dsn(service)
            return
        _check_ports(os.environ.get("PGPORT", "").split(","), cut_short=False, what="$PGPORT")
        return
    try:
        parts = urllib.parse.urlsplit(dsn)
        query = urllib.parse.parse_qs(parts.query)
    except ValueError as exc:  # an unclosed IPv6 bracket, say
        raise DsnError(f"is not a valid URL ({exc})") from None
    if parts.scheme not in ("postgres", "postgresql"):
        if parts.scheme.startswith(("postgres+", "postgresql+")):
            raise DsnError(
                f"is a SQLAlchemy URL ({parts.scheme}://); pgqueue takes the plain"
                " postgresql:// URL it names"
            )
        if "=" in dsn and "://" not in dsn:
            raise DsnError(
                "is a keyword/value connection string; pgqueue (asyncpg) takes URLs only:"
                " postgresql://USER@HOST:PORT/DBNAME"
            )
        raise DsnError("is not a postgresql:// URL")
    if "service" in query:
        _check_service(query["service"][-1])
    unknown = sorted(_LIBPQ_ONLY.intersection(query))
    if unknown:
        raise DsnError(
            f"has {', '.join(unknown)}: libpq reads it, asyncpg does not (it would send it to"
            " the server as a setting, which refuses it); leave it out"
        )
    for value in query.get("sslmode", []):
        if value not in SSLMODES:
            raise DsnError(f"has sslmode {value!r}: not one of {', '.join(SSLMODES)}")
    for value in query.get("connect_timeout", []):
        if not re.fullmatch(r"\s*[-+]?[0-9]{1,9}\s*", value):
            raise DsnError(f"has connect_timeout {value!r}: not a whole number of seconds")
    for value in query.get("statement_cache_size", []):
        if not re.fullmatch(r"\s*[0-9]{1,9}\s*", value):
            raise DsnError(
                f"has statement_cache_size {value!r}: not a whole number of statements (0 or more)"
            )
    hosts = parts.netloc.rpartition("@")[2].split(",")
    hosts += [h for value in query.get("host", []) for h in value.split(",")]
    ports = [_port_of(host) for host in hosts if not host.startswith("/")]  # "/": a socket dir
    ports += [p for value in query.get("port", []) for p in value.split(",")]
    # A '#', '?' or '/' in the password ends the URL's host part early (urlsplit and asyncpg
    # agree): what looks like a port may then be a piece of the password.
    _check_ports(ports, cut_short="@" in dsn and "@" not in parts.netloc)


# libpq's connection parameters that asyncpg neither reads nor may pass on: asyncpg sends a
# query parameter it does not know to the server as a setting, and the server refuses these
# ("unrecognized configuration parameter"), an error that blamed the database. libpq's
# connect_timeout, the one such parameter production DSNs often carry, is taken instead
# (:func:`connect_arguments`).
_LIBPQ_ONLY = frozenset(
    "hostaddr require_auth channel_binding fallback_application_name keepalives"
    " keepalives_idle keepalives_interval keepalives_count tcp_user_timeout gssencmode"
    " requiressl sslcompression sslcertmode sslcrldir sslsni requirepeer gssdelegation"
    " load_balance_hosts".split()
)


SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


# The DSN's query parameters that pgqueue reads itself, and asyncpg would send to the
# server as settings, which refuses them: libpq's connect_timeout (asyncpg's ``timeout``) and
# asyncpg's own statement_cache_size (see the worker guide's "Behind PgBouncer").
_READ_HERE = ("connect_timeout", "statement_cache_size")


def connect_arguments(dsn: str | None, application_name: str) -> dict[str, Any]:
    """``asyncpg.connect``'s (and ``create_pool``'s) arguments for pgqueue's own connections
    to ``dsn``, once :func:`check_dsn` passed it: ``$PGSERVICE`` as a URL (see
    :func:`service_dsn`), the startup settings (:func:`server_settings`), libpq's
    ``connect_timeout`` as asyncpg's ``timeout`` (like libpq, 0 or less sets none:
    asyncpg's default, 60 s, holds), and ``statement_cache_size`` as asyncpg's (0: no
    named prepared statements, for a pooler in transaction mode that does not relay them)."""
    check_dsn(dsn)
    dsn = dsn or service_dsn()
    arguments: dict[str, Any] = {"server_settings": server_settings(dsn, application_name)}
    if dsn is not None and any(name in dsn for name in _READ_HERE):
        parts = urllib.parse.urlsplit(dsn)
        params = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        read = {k: v.strip() for k, v in params if k in _READ_HERE}  # the last one of each
        if read:
            rest = [(k, v) for k, v in params if k not in _READ_HERE]
            query = urllib.parse.urlencode(rest, quote_via=urllib.parse.quote)
            dsn = urllib.parse.urlunsplit(parts._replace(query=query))
        if read.get("connect_timeout") and int(read["connect_timeout"]) > 0:
            arguments["timeout"] = float(read["connect_timeout"])
        if read.get("statement_cache_size"):
            arguments["statement_cache_size"] = int(read["statement_cache_size"])
    arguments["dsn"] = dsn
    return arguments


def service_dsn() -> str | None:
    """``$PGSERVICE`` as the URL asyncpg reads it from (``postgresql://?service=NAME``).

    asyncpg reads a service named in a DSN, but not ``$PGSERVICE`` when it is given no DSN:
    it then connected to its defaults (the database named after the OS user), and
    ``pgqueue migrate`` created the schema there. Parts the service leaves out still come
    from ``PGHOST`` and friends, as with libpq.
    """
    service = os.environ.get("PGSERVICE")
    if not service:
        return None
    return "postgresql://?" + urllib.parse.urlencode({"service": service})


def _check_service(name: str) -> None:
    """Refuse a connection service asyncpg would not find: it ignores an unknown one and
    connects to its defaults. asyncpg reads ``$PGSERVICEFILE``, else ``~/.pg_service.conf``;
    not libpq's system-wide ``pg_service.conf``."""
    path = os.environ.get("PGSERVICEFILE") or str(pathlib.Path.home() / ".pg_service.conf")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path)
    except configparser.Error as exc:
        raise DsnError(f"cannot read the connection service file {path}: {exc}") from None
    if name not in parser.sections():
        raise DsnError(
            f"the connection service {name!r} is not defined in {path} (asyncpg reads"
            " $PGSERVICEFILE, else ~/.pg_service.conf; not the system-wide pg_service.conf)"
        )


def _port_of(host: str) -> str:
    """The port of ``host:port`` or ``[ipv6]:port``, split where asyncpg splits it."""
    if host.startswith("["):
        return host.partition("]")[2].removeprefix(":")
    return host.partition(":")[2]


def _check_ports(ports: list[str], *, cut_short: bool, what: str = "port") -> None:
    for port in ports:
        digits = port.lstrip("0")  # int() of 4,300 digits raises; a port has at most 5
        if port and not (
            port.isascii() and port.isdigit() and 0 < len(digits) <= 5 and int(digits) < 65536
        ):
            if cut_short:
                raise DsnError(
                    "has a port that is not a number from 1 to 65535 (percent-encode a '#',"
                    " '?' or '/' in the password)"
                )
            raise DsnError(f"{what} {port[:20]!r} is not a number from 1 to 65535")


def dumps(value: Any, what: str = "a JSON value") -> str:
    """Encode a value as strict JSON: no NaN/Infinity and no NUL in a string, which
    PostgreSQL's jsonb rejects (a NUL with two lines about an "unsupported Unicode escape
    sequence" that named no argument). ``what`` names the value in that refusal."""
    text = json.dumps(value, allow_nan=False, separators=(",", ":"), default=_json_default)
    if "\\u0000" in text and _NUL.search(text):
        raise ValueError(
            f"{what} holds \\u0000 (NUL) in a string, which PostgreSQL's jsonb cannot store"
        )
    return text


# A JSON escape of NUL, not an escaped backslash followed by "u0000".
_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def id_array(ids: Iterable[int]) -> str:
    """Job ids as PostgreSQL array text (``{1,2,3}``), for a parameter cast ``$n::text::bigint[]``.

    asyncpg knows the binary form of only a few array types (text[] and oid[]) without asking
    the server; for any other it runs a catalog query, 8-12 ms here, on every new connection
    the first time a statement uses one: the first enqueue with a bigint[] parameter, or a
    worker's first completion on each pooled connection. Text needs no such lookup. Anything
    integral is taken (int subclasses, IntEnum members, numpy integers, as asyncpg took them)
    except bools and floats, so the text is always an array of integers.
    """
    return "{" + ",".join(str(as_job_id(item)) for item in ids) + "}"


def as_job_id(item: Any) -> int:
    if isinstance(item, bool):
        raise TypeError(f"a job id must be an integer, got {item!r}")
    try:
        return operator.index(item)
    except TypeError:
        raise TypeError(f"a job id must be an integer, got {item!r}") from None


def as_aware(value: Any) -> Any:
    """A ``run_after`` without a time zone, read as UTC (as asyncpg reads one for a
    timestamptz parameter), given as a datetime or as ISO 8601 text; anything else
    unchanged. Sent as JSON text, or through another driver, PostgreSQL would read it in
    the session's TimeZone instead, so one naive timestamp would mean a different instant
    on each enqueue path."""
    if isinstance(value, datetime.datetime):
        return value.replace(tzinfo=datetime.UTC) if value.utcoffset() is None else value
    if isinstance(value, datetime.date):  # a day: its midnight, UTC (asyncpg's reading too)
        return datetime.datetime.combine(value, datetime.time(), datetime.UTC)
    if isinstance(value, str):  # in a spec: read here, or PostgreSQL reads it in its TimeZone
        try:
            return as_aware(datetime.datetime.fromisoformat(value))
        except ValueError:
            raise ValueError(
                f"run_after must be a datetime or an ISO 8601 timestamp, got {value!r}"
            ) from None
    return value


def _json_default(value: Any) -> Any:
    """Encode the few non-JSON types that job specs commonly carry (datetimes, UUIDs, and
    the Decimals asyncpg and SQLAlchemy read numeric columns as)."""
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Decimal):
        return _decimal_number(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _decimal_number(value: Decimal) -> int | float:
    """A Decimal as the JSON number of the same value: an int when it is whole, else the
    float that prints as the same number. One a float cannot hold is refused by name rather
    than rounded (json can only write an int or a float as a number)."""
    if not value.is_finite():
        raise ValueError(f"Decimal {value} is not a JSON number")
    if value == value.to_integral_value():
        return int(value)
    number = float(value)
    if Decimal(repr(number)) != value:
        raise ValueError(
            f"Decimal {value} has more digits than a JSON number read as a float keeps;"
            " pass it as a string (or round it to a float yourself)"
        )
    return number


# json.loads wraps the C scanner in two regular-expression matches for surrounding
# whitespace; on every claimed job's payload they cost as much as the parse itself.
# (typeshed types the scanner's argument as a scanner; it is the decoder whose settings it reads)
_scan: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(
    cast(Any, json.JSONDecoder())
)


def loads(text: str) -> Any:
    """Decode JSON text as PostgreSQL prints it: jsonb output never starts or ends with
    whitespace, so the scanner alone reads it whole. Anything it does not read whole (a
    ``json`` value keeps the whitespace it was written with) goes through ``json.loads``,
    which also raises its usual errors."""
    try:
        value, end = _scan(text, 0)
    except (StopIteration, ValueError):
        return json.loads(text)
    return value if end == len(text) else json.loads(text)


async def init_connection(conn: asyncpg.Connection) -> None:
    """Decode json/jsonb columns into Python objects (and encode them back) on our connections."""
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename, schema="pg_catalog", encoder=dumps, decoder=loads, format="text"
        )


def server_settings(dsn: str | None, application_name: str) -> dict[str, str]:
    """Startup parameters for pgqueue's own connections: the ``application_name``, and
    ``$PGOPTIONS`` (``-c name=value ...``) as libpq sends it, unless the DSN gives
    ``options`` itself. asyncpg reads neither variable; the server parses ``options``.

    Nothing else: PgBouncer refuses a startup parameter it does not track (a
    ``default_transaction_isolation`` here closed every connection through it)."""
    settings = {"application_name": application_name[:63]}
    options = os.environ.get("PGOPTIONS")
    if options and not (
        dsn and "options" in urllib.parse.parse_qs(urllib.parse.urlsplit(dsn).query)
    ):
        settings["options"] = options
    return settings


async def connect(dsn: str | None, *, application_name: str = "pgqueue") -> asyncpg.Connection:
    """Open one dedicated connection (codecs set, named so ``pg_stat_activity`` shows who it is)."""
    conn: asyncpg.Connection = await asyncpg.connect(**connect_arguments(dsn, application_name))
    await init_connection(conn)
    return conn


async def _reset_connection(conn: asyncpg.Connection) -> None:
    """Cheap reset on release: pgqueue's pooled work is single autocommit statements.

    asyncpg's default reset sends ``RESET ALL; UNLISTEN *; ...`` on every release, a second
    round trip per claim and per completion; only an interrupted transaction needs undoing.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def create_pool(
    dsn: str | None, *, warm: int, max_size: int, application_name: str = "pgqueue"
) -> asyncpg.Pool:
    """Open a pool whose every connection has the codecs and the application name set.

    ``warm`` connections are opened up front and never closed for being idle, so the first
    job after a quiet hour does not pay for a connection. A ``min_size`` floor would be kept
    by reconnecting in the background, logging a traceback per failed try during an outage;
    with ``init_size`` we get warm connections without that floor, and dead ones are
    replaced on the next acquire instead.
    """
    pool: asyncpg.Pool = await asyncpg.create_pool(
        min_size=0,
        init_size=warm,
        max_size=max_size,
        max_inactive_connection_lifetime=0,
        init=init_connection,
        reset=_reset_connection,
        **connect_arguments(dsn, application_name),
    )
    return pool
