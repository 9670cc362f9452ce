"""The interaction store: what users did, recorded through RecordInteractions, merged into every later
request and read by the next training run.

Two implementations of one small interface, with one schema:
- SQLite (embedded, the default): one file in WAL mode, every call committed with synchronous=FULL;
- PostgreSQL (shared by several replicas), through psycopg 3.
One row per (user, movie): a retried call records nothing twice, and the latest rating wins (by
timestamp; a rating-less interaction never replaces a rating). The server applies the schema's
migrations at start; they are idempotent, and concurrent starts take a lock.

A store that fails raises `StoreUnavailable`. After a failure the store is not tried again for a
short, growing pause (a circuit breaker), so an outage costs requests nothing while it lasts; each
thread then reconnects by itself.
"""
from __future__ import annotations

import abc
import contextlib
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from server.errors import StoreUnavailable

log = logging.getLogger("recsys.server")

NO_STORE = "none"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# How long a failed store is left alone before the next try, doubling up to the maximum.
RETRY_SECONDS = 0.5
MAX_RETRY_SECONDS = 8.0
CONNECT_TIMEOUT_SECONDS = 2
STATEMENT_TIMEOUT_MS = 2000

# Each migration runs once, in order, inside the transaction that records its number.
MIGRATIONS = (
    """CREATE TABLE interactions (
        user_id TEXT NOT NULL,
        item_id TEXT NOT NULL,
        rating REAL NOT NULL,             -- stars of the latest rating; 0 = never rated
        rated_at BIGINT NOT NULL,         -- Unix seconds of that rating (0 if none)
        timestamp_seconds BIGINT NOT NULL, -- Unix seconds of the latest interaction
        PRIMARY KEY (user_id, item_id))""",
    "CREATE INDEX interactions_newest_first ON interactions (user_id, timestamp_seconds DESC)",
)


@dataclass(frozen=True)
class StoredInteraction:
    item_id: str
    rating: float  # 0 = no rating
    timestamp_seconds: int


def _upsert(greatest: str, placeholder: str) -> str:
    newer_rating = "excluded.rating > 0 AND excluded.rated_at >= interactions.rated_at"
    return (f"INSERT INTO interactions (user_id, item_id, rating, rated_at, timestamp_seconds) "
            f"VALUES ({', '.join([placeholder] * 5)}) "
            f"ON CONFLICT (user_id, item_id) DO UPDATE SET "
            f"rating = CASE WHEN {newer_rating} THEN excluded.rating ELSE interactions.rating END, "
            f"rated_at = CASE WHEN {newer_rating} THEN excluded.rated_at ELSE interactions.rated_at END, "
            f"timestamp_seconds = {greatest}(interactions.timestamp_seconds, excluded.timestamp_seconds)")


def _rows(user_id: str, interactions: Sequence[tuple[str, float, int]], now: int) -> list[tuple]:
    """One row per interaction, in order (the upsert keeps the latest); an unknown time is now."""
    rows = []
    for item_id, rating, timestamp in interactions:
        timestamp = timestamp or now
        rows.append((user_id, item_id, float(rating), timestamp if rating else 0, timestamp))
    return rows


class InteractionStore(abc.ABC):
    """Where recorded interactions live. Every method raises StoreUnavailable when the store fails."""

    kind: str

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self._backoff = RETRY_SECONDS
        self.failures = 0  # calls that failed in the store since start (a metric)
        self._writing = contextlib.nullcontext()  # what a write holds (SQLiteStore: one writer at a time)

    # --- what a backend provides ---------------------------------------------------------------
    @abc.abstractmethod
    def _connect(self):
        """A new connection (one per thread), schema applied."""

    @abc.abstractmethod
    def _errors(self) -> tuple[type[BaseException], ...]:
        """The driver's exceptions that mean the store failed."""

    upsert_sql: str
    recent_sql: str
    placeholder: str

    # --- the interface -------------------------------------------------------------------------
    def record(self, user_id: str, interactions: Sequence[tuple[str, float, int]]) -> int:
        """Store (movie, stars, unix seconds) interactions, committed before returning; returns how
        many movies they name. Timestamp 0 means now."""
        rows = _rows(user_id, interactions, int(time.time()))

        def write(connection) -> None:
            with self._writing, self._transaction(connection) as cursor:
                cursor.executemany(self.upsert_sql, rows)

        self._run(write)
        return len({item_id for item_id, _, _ in interactions})

    def recent(self, user_ids: Sequence[str], limit: int) -> dict[str, list[StoredInteraction]]:
        """Each user's newest `limit` interactions (newest first), all users in one query."""
        users = sorted(set(user_ids))
        if not users or limit <= 0:
            return {}

        def read(connection) -> list[tuple]:
            with self._transaction(connection) as cursor:
                cursor.execute(self.recent_sql.format(users=", ".join([self.placeholder] * len(users)),
                                                      limit=self.placeholder), (*users, limit))
                return cursor.fetchall()

        found: dict[str, list[StoredInteraction]] = {}
        for user_id, item_id, rating, timestamp in self._run(read):
            found.setdefault(user_id, []).append(StoredInteraction(item_id, float(rating), int(timestamp)))
        return found

    def forget(self, user_id: str) -> int:
        """Delete every interaction of `user_id`; returns how many."""

        def delete(connection) -> int:
            with self._writing, self._transaction(connection) as cursor:
                cursor.execute(f"DELETE FROM interactions WHERE user_id = {self.placeholder}", (user_id,))
                return cursor.rowcount

        return self._run(delete)

    def export(self) -> Iterator[tuple[str, str, float, int]]:
        """Every stored (user, movie, stars, unix seconds), for training."""

        def read(connection) -> list[tuple]:
            with self._transaction(connection) as cursor:
                cursor.execute("SELECT user_id, item_id, rating, timestamp_seconds FROM interactions "
                               "ORDER BY user_id, item_id")
                return cursor.fetchall()

        for user_id, item_id, rating, timestamp in self._run(read):
            yield user_id, item_id, float(rating), int(timestamp)

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            self._local.connection = None
            connection.close()

    # --- connections, failures and the breaker -----------------------------------------------------
    def _transaction(self, connection):
        return _Transaction(connection)

    def _run(self, work):
        with self._lock:
            if time.monotonic() < self._retry_at:
                raise StoreUnavailable(f"the interaction store ({self.kind}) is unavailable; retry later")
        try:
            connection = getattr(self._local, "connection", None)
            if connection is None:
                connection = self._local.connection = self._connect()
            result = work(connection)
        except self._errors() as error:
            self._fail(error)
        with self._lock:
            self._backoff = RETRY_SECONDS
        return result

    def _fail(self, error: BaseException):
        connection, self._local.connection = getattr(self._local, "connection", None), None
        if connection is not None:
            try:
                connection.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close too
                pass
        with self._lock:
            self.failures += 1
            self._retry_at = time.monotonic() + self._backoff
            pause, self._backoff = self._backoff, min(MAX_RETRY_SECONDS, self._backoff * 2)
        log.warning("interaction store (%s) failed (%s: %s); next try in %.1f s", self.kind, type(error).__name__,
                    str(error).strip().splitlines()[0] if str(error).strip() else "", pause)
        raise StoreUnavailable(f"the interaction store ({self.kind}) is unavailable; retry later") from None


class _Transaction:
    """A cursor whose work is committed on success and rolled back on failure."""

    def __init__(self, connection):
        self.connection = connection

    def __enter__(self):
        self.cursor = self.connection.cursor()
        return self.cursor

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                self.connection.commit()
            else:
                self.connection.rollback()
        finally:
            self.cursor.close()


def _migrate(cursor, placeholder: str) -> None:
    cursor.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)")
    cursor.execute("SELECT version FROM schema_migrations")
    applied = {row[0] for row in cursor.fetchall()}
    for version, statement in enumerate(MIGRATIONS, start=1):
        if version not in applied:
            cursor.execute(statement)
            cursor.execute(f"INSERT INTO schema_migrations (version) VALUES ({placeholder})", (version,))


RECENT_SQL = ("SELECT user_id, item_id, rating, timestamp_seconds FROM ("
              "SELECT user_id, item_id, rating, timestamp_seconds, ROW_NUMBER() OVER ("
              "PARTITION BY user_id ORDER BY timestamp_seconds DESC, item_id) AS position "
              "FROM interactions WHERE user_id IN ({users})) AS newest WHERE position <= {limit} "
              "ORDER BY user_id, position")


class SQLiteStore(InteractionStore):
    """One SQLite file in WAL mode: readers never wait for the writer, and a commit is on disk
    (synchronous=FULL) before RecordInteractions answers."""

    kind = "sqlite"
    placeholder = "?"
    upsert_sql = _upsert("MAX", "?")
    recent_sql = RECENT_SQL

    def __init__(self, path: str | Path):
        super().__init__()
        # SQLite runs one write at a time whatever we do; taking turns here rather than in its busy
        # handler (which sleeps and retries) keeps writes from waiting seconds under contention.
        self._writing = threading.Lock()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._connect().close()  # create the file and apply the schema now: a bad path fails at start

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.isolation_level = "IMMEDIATE"  # Python opens a transaction before each write
        cursor = connection.cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE")  # one starting server migrates at a time
            _migrate(cursor, self.placeholder)
            connection.commit()
        except BaseException:
            connection.rollback()
            connection.close()
            raise
        finally:
            cursor.close()
        return connection

    def _errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error,)


class PostgresStore(InteractionStore):
    """A PostgreSQL database shared by every replica (psycopg 3, one connection per thread)."""

    kind = "postgresql"
    placeholder = "%s"
    upsert_sql = _upsert("GREATEST", "%s")
    recent_sql = RECENT_SQL
    MIGRATION_LOCK = 7_407_001  # pg_advisory_xact_lock key: one starting server migrates at a time

    def __init__(self, url: str):
        super().__init__()
        import psycopg

        self._psycopg = psycopg
        self.url = url
        try:  # apply the schema now; a database down at start is retried like any outage
            self._connect().close()
        except psycopg.Error as error:
            log.warning("interaction store (postgresql) not reachable at start (%s); retrying as calls come",
                        str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)

    def _connect(self):
        connection = self._psycopg.connect(self.url, connect_timeout=CONNECT_TIMEOUT_SECONDS,
                                           options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}")
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", (self.MIGRATION_LOCK,))
                _migrate(cursor, self.placeholder)
            connection.commit()
        except BaseException:
            connection.close()
            raise
        return connection

    def _errors(self) -> tuple[type[BaseException], ...]:
        return (self._psycopg.Error,)


def open_store(location: str) -> InteractionStore | None:
    """`none`, a `postgresql://` URL, or a path to an SQLite file (created if missing)."""
    if location == NO_STORE:
        return None
    if location.startswith(POSTGRES_SCHEMES):
        return PostgresStore(location)
    return SQLiteStore(location)


def describe(location: str) -> str:
    """The location without a password, for logs."""
    if location.startswith(POSTGRES_SCHEMES):
        scheme, _, rest = location.partition("://")
        credentials, at, host = rest.rpartition("@")
        return f"{scheme}://{credentials.split(':')[0] + '@' if at else ''}{host}"
    return location
