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
thread then reconnects by itself. A value the store cannot hold (a NUL byte in PostgreSQL text) is
the request's fault, `InvalidRequest`, and never trips the breaker.

Each user keeps at most `max_per_user` rows: a write drops that user's oldest beyond it in the same
transaction, so one caller recording millions of rows under one id cannot make that id's reads (or
anyone's) slow. The newest rows come from an index in (user, newest first) order.
"""
from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import logging
import queue
import sqlite3
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from recsys.server.errors import InvalidRequest, StoreUnavailable
from recsys.server.options import DEFAULTS
from recsys.server.validation import Interaction

log = logging.getLogger("recsys.server")

NO_STORE = "none"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# How long a failed store is left alone before the next try, doubling up to the maximum.
RETRY_SECONDS = 0.5
MAX_RETRY_SECONDS = 8.0
CONNECT_TIMEOUT_SECONDS = 2
STATEMENT_TIMEOUT_MS = 2000
# Reads for Recommend run on threads of their own, each waiting at most its caller's budget.
READ_THREADS = 4
# Reads waiting for those threads beyond this are refused at once (a hung store queues nothing more).
MAX_WAITING_READS = 64
# Rows per page of `export` (training's read): each page is a statement of its own, well within
# STATEMENT_TIMEOUT_MS, and a page at a time is what the reader holds.
EXPORT_PAGE_ROWS = 50_000

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
    # The newest rows in the order reads and the per-user cap take them (ties by movie id).
    "CREATE INDEX interactions_by_recency ON interactions (user_id, timestamp_seconds DESC, item_id)",
    "DROP INDEX interactions_newest_first",
    # Tombstones: users erased by ForgetUser (by the SHA-256 of their id: the id itself is gone), and
    # when. Later writes older than that are dropped.
    "CREATE TABLE forgotten (user_hash TEXT PRIMARY KEY, forgotten_at BIGINT NOT NULL)",
    # Reads of the newest rows need nothing else: with the stars in the index they never visit the table.
    "CREATE INDEX interactions_newest ON interactions (user_id, timestamp_seconds DESC, item_id, rating)",
    "DROP INDEX interactions_by_recency",
)


@dataclass(frozen=True)
class UserRecords:
    """What the store holds for a batch's users: each one's newest interactions, newest first, and
    which of them were erased (ForgetUser), whom the models must then serve as unknown ids."""

    recent: dict[str, list[Interaction]]
    forgotten: frozenset[str] = frozenset()


NO_RECORDS = UserRecords({})


def user_hash(user_id: str) -> str:
    """How a tombstone names an erased user: SHA-256 of the id, hex. It tells whether a given id was
    erased, and keeps no list of erased ids."""
    return hashlib.sha256(user_id.encode("utf-8")).hexdigest()


def _upsert(greatest: str, placeholder: str) -> str:
    newer_rating = "excluded.rating > 0 AND excluded.rated_at >= interactions.rated_at"
    return (f"INSERT INTO interactions (user_id, item_id, rating, rated_at, timestamp_seconds) "
            f"VALUES ({', '.join([placeholder] * 5)}) "
            f"ON CONFLICT (user_id, item_id) DO UPDATE SET "
            f"rating = CASE WHEN {newer_rating} THEN excluded.rating ELSE interactions.rating END, "
            f"rated_at = CASE WHEN {newer_rating} THEN excluded.rated_at ELSE interactions.rated_at END, "
            f"timestamp_seconds = {greatest}(interactions.timestamp_seconds, excluded.timestamp_seconds)")


def _rows(user_id: str, interactions: Sequence[Interaction], now: int) -> list[tuple]:
    """One row per interaction, in order (the upsert keeps the latest); an unknown time is now."""
    rows = []
    for entry in interactions:
        timestamp = entry.timestamp_seconds or now
        rows.append((user_id, entry.item_id, float(entry.rating), timestamp if entry.rating else 0, timestamp))
    return rows


class InteractionStore(abc.ABC):
    """Where recorded interactions live. Every method raises StoreUnavailable when the store fails."""

    kind: str

    def __init__(self, max_per_user: int = DEFAULTS.max_interactions_per_user) -> None:
        if max_per_user < 1:
            raise ValueError(f"max_per_user must be at least 1; got {max_per_user}")
        self.max_per_user = max_per_user
        self._local = threading.local()
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self._backoff = RETRY_SECONDS
        self.failures = 0  # calls that failed in the store since start (a metric)
        self.read_timeouts = 0  # budgeted reads that ran out of time or found every read thread busy (a metric)
        self._readers = _DaemonThreads(READ_THREADS, "store-read")
        self._reads_waiting = 0
        self._writing = contextlib.nullcontext()  # what a write holds (SQLiteStore: one writer at a time)
        self._erased_here: set[str] = set()  # user_hash of each erasure made through this object

    # --- what a backend provides ---------------------------------------------------------------
    @abc.abstractmethod
    def _connect(self):
        """A new connection (one per thread), schema applied."""

    @abc.abstractmethod
    def _errors(self) -> tuple[type[BaseException], ...]:
        """The driver's exceptions that mean the store failed."""

    def _data_errors(self) -> tuple[type[BaseException], ...]:
        """The driver's exceptions that mean one request's values cannot be stored (not an outage)."""
        return ()

    upsert_sql: str
    # Deletes a user's rows beyond the newest N (parameters: user, user, N).
    trim_sql: str
    # Records (or moves forward) a user's tombstone (parameters: user_hash of the id, unix seconds).
    tombstone_sql: str
    # Aggregates a user's rows into one JSON array of [movie, stars, time] (see newest_sql).
    aggregate_sql: str
    placeholder: str

    # --- the interface -------------------------------------------------------------------------
    def record(self, user_id: str, interactions: Sequence[Interaction]) -> int:
        """Store interactions (stars 0: none; unix seconds), committed before returning; returns how
        many movies were recorded. Timestamp 0 means now. For an erased user, interactions older than
        the erasure (a late or retried write) are dropped; newer ones are recorded."""
        rows = _rows(user_id, interactions, int(time.time()))

        def write(connection) -> int:
            with self._writing, self._transaction(connection) as cursor:
                cursor.execute(f"SELECT forgotten_at FROM forgotten WHERE user_hash = {self.placeholder}",
                               (user_hash(user_id),))
                tombstone = cursor.fetchone()
                kept = [row for row in rows if tombstone is None or row[4] >= tombstone[0]]
                if kept:
                    cursor.executemany(self.upsert_sql, kept)
                    cursor.execute(self.trim_sql, (user_id, user_id, self.max_per_user))
                return len({row[1] for row in kept})

        return self._run(write)

    def recent(self, user_ids: Sequence[str], limit: int) -> dict[str, list[Interaction]]:
        """Each user's newest `limit` interactions (newest first), all users in one query."""
        return self.records(user_ids, limit).recent

    def records(self, user_ids: Sequence[str], limit: int) -> UserRecords:
        """Each user's newest `limit` interactions (newest first; none for a limit of 0) and which users
        were erased, in one transaction."""
        users = sorted(set(user_ids))
        if not users:
            return NO_RECORDS
        marks = ", ".join([self.placeholder] * len(users))

        def read(connection) -> tuple[list[tuple], list[tuple]]:
            with self._transaction(connection) as cursor:
                rows = []
                if limit > 0:
                    cursor.execute(newest_sql(self.placeholder, self.aggregate_sql, len(users)),
                                   [value for user in users for value in (user, limit)])
                    rows = cursor.fetchall()
                cursor.execute(f"SELECT user_hash FROM forgotten WHERE user_hash IN ({marks})",
                               [user_hash(user) for user in users])
                return rows, cursor.fetchall()

        rows, forgotten = self._run(read)
        found = {user_id: _newest_first(entries) for user_id, entries in rows if user_id is not None}
        erased = {hashed for hashed, in forgotten}
        return UserRecords(found, frozenset(user for user in users if user_hash(user) in erased))

    def records_within(self, user_ids: Sequence[str], limit: int, seconds: float) -> UserRecords:
        """`records` on the store's own read threads, waited for at most `seconds`.

        A hung store (a frozen PostgreSQL never enforces statement_timeout) then costs a caller this
        budget, never its whole deadline, and never holds up the thread that called: raises
        StoreUnavailable when the budget runs out or MAX_WAITING_READS reads are already waiting."""
        with self._lock:
            busy = self._reads_waiting >= MAX_WAITING_READS
            if busy:
                self.read_timeouts += 1
            else:
                self._reads_waiting += 1
        if busy:
            raise StoreUnavailable(f"the interaction store ({self.kind}) has {MAX_WAITING_READS} reads waiting")
        future = self._readers.submit(self.records, user_ids, limit)
        future.add_done_callback(self._read_done)
        try:
            return future.result(timeout=seconds)
        except futures.TimeoutError:
            with self._lock:
                self.read_timeouts += 1
            raise StoreUnavailable(f"the interaction store ({self.kind}) did not answer within "
                                   f"{seconds * 1000:.0f} ms") from None

    def _read_done(self, _future: futures.Future) -> None:
        with self._lock:
            self._reads_waiting -= 1

    def forget(self, user_id: str) -> int:
        """Delete every interaction of `user_id` and leave a tombstone (now) in the same transaction;
        returns how many interactions were deleted."""
        now = int(time.time())

        def delete(connection) -> int:
            with self._writing:
                with self._transaction(connection) as cursor:
                    cursor.execute(f"DELETE FROM interactions WHERE user_id = {self.placeholder}", (user_id,))
                    deleted = cursor.rowcount
                    cursor.execute(self.tombstone_sql, (user_hash(user_id), now))
                self._after_erasure(connection)
            return deleted

        deleted = self._run(delete)
        with self._lock:
            self._erased_here.add(user_hash(user_id))
        return deleted

    def erased_here(self, user_ids: Sequence[str]) -> frozenset[str]:
        """Which of `user_ids` were erased through this object, known without reading the store: so that
        an erasure holds at once on this server when a read fails or runs out of its budget. Erasures
        through other servers hold from their next read that answers. One hash per erasure."""
        with self._lock:
            return frozenset(user for user in user_ids if user_hash(user) in self._erased_here)

    def _after_erasure(self, connection) -> None:  # noqa: B027 - optional: SQLite's WAL needs it
        """What makes an erasure reach the disk's old pages too (SQLite: the WAL); nothing by default."""

    def forgotten_hashes(self) -> set[str]:
        """`user_hash` of every erased user (training leaves them out)."""

        def read(connection) -> list[tuple]:
            with self._transaction(connection) as cursor:
                cursor.execute("SELECT user_hash FROM forgotten")
                return cursor.fetchall()

        return {hashed for hashed, in self._run(read)}

    def export(self, page_rows: int = EXPORT_PAGE_ROWS) -> Iterator[tuple[str, str, float, int]]:
        """Every stored (user, movie, stars, unix seconds), for training, in (user, movie) order: keyset
        pages of `page_rows` rows, each read in a short transaction of its own, so neither the store
        nor this process holds the whole table at once (rows written meanwhile may or may not appear)."""
        after: tuple[str, str] | None = None
        while True:
            def read(connection, after=after) -> list[tuple]:
                with self._transaction(connection) as cursor:
                    where = f"WHERE (user_id, item_id) > ({self.placeholder}, {self.placeholder}) " if after else ""
                    cursor.execute("SELECT user_id, item_id, rating, timestamp_seconds FROM interactions "
                                   f"{where}ORDER BY user_id, item_id LIMIT {int(page_rows)}", after or ())
                    return cursor.fetchall()

            page = self._run(read)
            for user_id, item_id, rating, timestamp in page:
                yield user_id, item_id, float(rating), int(timestamp)
            if len(page) < page_rows:
                return
            after = (page[-1][0], page[-1][1])

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
        except self._data_errors() as error:
            raise InvalidRequest(f"the interaction store ({self.kind}) cannot hold a value of this request: "
                                 f"{_first_line(error)}") from None
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
                    _first_line(error), pause)
        raise StoreUnavailable(f"the interaction store ({self.kind}) is unavailable; retry later") from None


class _DaemonThreads:
    """A fixed number of daemon threads running submitted calls in order (started on first use).

    Not a ThreadPoolExecutor: its threads are joined at interpreter exit, so one read stuck in a
    hung store would keep the server from exiting."""

    def __init__(self, count: int, name: str):
        self.count, self.name = count, name
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._started = False
        self._lock = threading.Lock()

    def submit(self, function, *args) -> futures.Future:
        with self._lock:
            if not self._started:
                for number in range(self.count):
                    threading.Thread(target=self._work, name=f"{self.name}-{number}", daemon=True).start()
                self._started = True
        future: futures.Future = futures.Future()
        self._tasks.put((future, function, args))
        return future

    def _work(self) -> None:
        while True:
            future, function, args = self._tasks.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function(*args))
            except BaseException as error:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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


def _trim_sql(placeholder: str, all_rows: str) -> str:
    return (f"DELETE FROM interactions WHERE user_id = {placeholder} AND item_id IN ("
            f"SELECT item_id FROM interactions WHERE user_id = {placeholder} "
            f"ORDER BY timestamp_seconds DESC, item_id LIMIT {all_rows} OFFSET {placeholder})")


def newest_sql(placeholder: str, aggregate: str, users: int) -> str:
    """Each of `users` users' newest rows (parameters: user id, limit, per user) as one row per user:
    (user id, a JSON array of [movie, stars, time]), NULL for a user with none.

    One LIMITed range scan of the covering interactions_newest index per user: a read takes N rows
    of a user however many the user keeps, and never visits the table. One row per user, not per
    interaction: the driver hands Python each row with the GIL taken again, and several read
    threads fetching thousands of rows each stalled one another (docs/performance.md, the store)."""
    arm = (f"SELECT MAX(user_id), {aggregate} FROM (SELECT user_id, item_id, rating, timestamp_seconds "
           f"FROM interactions WHERE user_id = {placeholder} ORDER BY timestamp_seconds DESC, item_id "
           f"LIMIT {placeholder}) AS newest")
    return " UNION ALL ".join(f"{arm}{n}" for n in range(users))


def _newest_first(entries) -> list[Interaction]:
    """The JSON array's entries (a string, or what the driver parsed), newest first, ties by movie id."""
    parsed = json.loads(entries) if isinstance(entries, str) else entries
    parsed.sort(key=lambda entry: (-entry[2], entry[0]))
    return [Interaction(item_id, float(rating), int(timestamp)) for item_id, rating, timestamp in parsed]


class SQLiteStore(InteractionStore):
    """One SQLite file in WAL mode: readers never wait for the writer, and a commit is on disk
    (synchronous=FULL) before RecordInteractions answers."""

    kind = "sqlite"
    placeholder = "?"
    upsert_sql = _upsert("MAX", "?")
    trim_sql = _trim_sql("?", "-1")
    tombstone_sql = ("INSERT INTO forgotten (user_hash, forgotten_at) VALUES (?, ?) ON CONFLICT (user_hash) "
                     "DO UPDATE SET forgotten_at = MAX(forgotten.forgotten_at, excluded.forgotten_at)")
    aggregate_sql = "json_group_array(json_array(item_id, rating, timestamp_seconds))"

    def __init__(self, path: str | Path, max_per_user: int = DEFAULTS.max_interactions_per_user):
        super().__init__(max_per_user)
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
        connection.execute("PRAGMA secure_delete=ON")  # deleted rows are overwritten, not left in free pages
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

    def _after_erasure(self, connection) -> None:
        # Copy the WAL into the database file and truncate it: the erased rows' old pages go with it.
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")


class PostgresStore(InteractionStore):
    """A PostgreSQL database shared by every replica (psycopg 3, one connection per thread)."""

    kind = "postgresql"
    placeholder = "%s"
    upsert_sql = _upsert("GREATEST", "%s")
    trim_sql = _trim_sql("%s", "ALL")
    tombstone_sql = ("INSERT INTO forgotten (user_hash, forgotten_at) VALUES (%s, %s) ON CONFLICT (user_hash) "
                     "DO UPDATE SET forgotten_at = GREATEST(forgotten.forgotten_at, excluded.forgotten_at)")
    aggregate_sql = "json_agg(json_build_array(item_id, rating, timestamp_seconds))"
    MIGRATION_LOCK = 7_407_001  # pg_advisory_xact_lock key: one starting server migrates at a time

    def __init__(self, url: str, max_per_user: int = DEFAULTS.max_interactions_per_user):
        super().__init__(max_per_user)
        import psycopg

        self._psycopg = psycopg
        self.url = url
        try:  # apply the schema now; a database down at start is retried like any outage
            self._connect().close()
        except psycopg.Error as error:
            log.warning("interaction store (postgresql) not reachable at start (%s); retrying as calls come",
                        _first_line(error))

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

    def _data_errors(self) -> tuple[type[BaseException], ...]:
        return (self._psycopg.DataError,)


def open_store(location: str, max_per_user: int = DEFAULTS.max_interactions_per_user) -> InteractionStore | None:
    """`none`, a `postgresql://` URL, or a path to an SQLite file (created if missing)."""
    if location == NO_STORE:
        return None
    if location.startswith(POSTGRES_SCHEMES):
        return PostgresStore(location, max_per_user)
    return SQLiteStore(location, max_per_user)


def describe(location: str) -> str:
    """The location without a password (in the URL's user part, its query or a DSN), for logs."""
    if not location.startswith(POSTGRES_SCHEMES):
        return location
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(location)
    except Exception:  # noqa: BLE001 - an unparsable URL is logged without any of its parts
        return "postgresql://(unparsable URL)"
    shown = " ".join(f"{key}={value}" for key, value in sorted(parts.items())
                     if key in ("host", "hostaddr", "port", "dbname", "user", "sslmode"))
    return f"postgresql ({shown})"
