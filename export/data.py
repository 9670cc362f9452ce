"""MovieLens (100k by default; 1M, 20M, 25M too): find it, read it strictly, split it the one fixed way.

Every evaluation in the project uses `split_row_numbers`, so numbers are comparable
across presets and baselines.
"""
from __future__ import annotations

import csv
import hashlib
import os
import shutil
import tempfile
import urllib.request
import zipfile
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from recsys.export.progress import Progress

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
ML100K_SHA256 = "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229"
DATA_DIR_ENV = "RECSYS_DATA_DIR"
CACHE_DIR_ENV = "RECSYS_CACHE_DIR"
LOCAL_DATA_ROOT = Path("data")
REQUIRED_FILES = ("u.data", "u.item", "u.user")
TRAIN_FRACTION = 0.8  # 80,000 of ML-100k's 100,000 ratings
SPLIT_SEED = 42
# Rows in the shuffle buffer when training streams the ratings (export/examples.py).
DEFAULT_SHUFFLE_BUFFER = 500_000
# Reading a file larger than this shows progress; lines are counted into it in blocks of this many.
PROGRESS_BYTES = 10_000_000
PROGRESS_LINES = 50_000
GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)


class DataSourceError(RuntimeError):
    """No usable copy of the data set could be found or fetched."""


class DataFormatError(ValueError):
    """A data file has a line that does not parse; the message names file and line."""


@dataclass(frozen=True)
class Item:
    item_id: str
    title: str
    release_date: str
    genres: tuple[str, ...]


@dataclass(frozen=True)
class User:
    user_id: str
    age: int
    gender: str
    occupation: str
    zip_code: str


MAX_ID_LENGTH = 128  # the contract's limit on user and movie ids (protos/recommender.proto)


def id_sort_key(identifier: str) -> tuple:
    """Ids in number order where they are numbers (MovieLens'), then the others in string order."""
    return (0, int(identifier), "") if identifier.isdigit() else (1, 0, identifier)


@dataclass(frozen=True)
class IdNames:
    """Code -> id, for the ratings' user and movie columns, which hold codes.

    MovieLens' own files have numeric ids, and there the code is the id (`numeric`); a catalog of
    one's own may use any strings, and there the code is the id's place in `id_sort_key` order.
    """

    users: np.ndarray  # str [codes]
    items: np.ndarray  # str [codes]

    @staticmethod
    def numeric(user_codes: np.ndarray, item_ids: Iterable[str]) -> "IdNames":
        largest_user = int(user_codes.max()) if len(user_codes) else 0
        largest_item = max((int(item_id) for item_id in item_ids), default=0)
        return IdNames(np.arange(largest_user + 1).astype(str), np.arange(largest_item + 1).astype(str))

    def user_ids(self, codes: np.ndarray) -> list[str]:
        return self.users[codes].tolist()

    def item_ids(self, codes: np.ndarray) -> list[str]:
        return self.items[codes].tolist()


@dataclass
class MovieLens:
    """Ratings as an int64 array of rows (user code, movie code, rating units, timestamp), in file order;
    `names` turns the codes into ids.

    A rating unit is `rating_scale` stars: 1 for the whole-star sets, 0.5 for the
    half-star ones (ML-20M, ML-25M), so every column stays an exact integer.
    """

    ratings: np.ndarray | None  # None when loaded for streaming (`load_movielens(with_ratings=False)`)
    items: dict[str, Item]
    users: dict[str, User]
    source: Path = field(default=Path("."))
    rating_scale: float = 1.0
    dataset: str = "ml-100k"
    names: IdNames | None = None  # None: built from the numeric ids (MovieLens' own files)

    def __post_init__(self) -> None:
        if self.names is None:
            self.names = IdNames.numeric(self.ratings[:, 0] if self.ratings is not None else np.zeros(0, np.int64),
                                         self.items)

    @property
    def item_ids(self) -> list[str]:
        """The catalog in `id_sort_key` order: the order of every model's movie vocabulary."""
        return sorted(self.items, key=id_sort_key)

    @property
    def spec(self) -> "DatasetSpec":
        return DATASETS[self.dataset]

    def stars(self, rows: np.ndarray) -> np.ndarray:
        return rows[:, 2].astype(np.float32) * self.rating_scale


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "recsys")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_complete(directory: Path, required: tuple[str, ...] = REQUIRED_FILES) -> bool:
    return all((directory / name).is_file() for name in required)


def download_dataset(cache_dir: Path, name: str = "ml-100k", url: str | None = None,
                     sha256: str | None = None) -> Path:
    """Download and unpack <name>.zip into cache_dir, refusing a file whose checksum differs."""
    spec = DATASETS[name]
    url, sha256 = url or spec.url, sha256 or spec.sha256
    target = cache_dir / name
    if _is_complete(target, spec.required_files):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    archive = cache_dir / f"{name}.zip"
    if not archive.is_file():
        with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".part", delete=False) as part:
            part_path = Path(part.name)
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(part_path, "wb") as out:
                shutil.copyfileobj(response, out)
            part_path.replace(archive)
        finally:
            part_path.unlink(missing_ok=True)
    actual = _sha256(archive)
    if actual != sha256:
        archive.unlink()
        raise DataSourceError(
            f"checksum mismatch for {archive}: expected sha256 {sha256}, got {actual}; "
            "the file was deleted, run again to re-download"
        )
    with zipfile.ZipFile(archive) as bundle:
        bundle.extractall(cache_dir)
    if not _is_complete(target, spec.required_files):
        raise DataSourceError(f"{archive} does not contain {name}/{{{','.join(spec.required_files)}}}")
    return target


def resolve_data_dir(data_dir: str | os.PathLike | None = None, allow_download: bool = True,
                     dataset: str = "ml-100k") -> Path:
    """Find the data set: --data-dir, then $RECSYS_DATA_DIR, then ./data/<dataset>, then download."""
    spec = DATASETS[dataset]
    local = LOCAL_DATA_ROOT / dataset
    ways = (
        f"pass --data-dir DIR, set {DATA_DIR_ENV}=DIR, or place the files in ./{local} "
        f"(DIR must hold {', '.join(spec.required_files)}); otherwise {dataset}.zip is downloaded "
        f"from GroupLens into {default_cache_dir()}"
    )
    explicit = [(str(data_dir), "--data-dir")] if data_dir else []
    if os.environ.get(DATA_DIR_ENV):
        explicit.append((os.environ[DATA_DIR_ENV], DATA_DIR_ENV))
    if explicit:
        # A source the user named must work: silently falling back would train on other data.
        path, how = explicit[0]
        if _is_complete(Path(path), spec.required_files):
            return Path(path)
        raise DataSourceError(f"{how}={path} is not a {spec.title} directory. To provide the data: {ways}")
    if _is_complete(local, spec.required_files):
        return local
    if not allow_download:
        raise DataSourceError(f"{spec.title} not found. To provide the data: {ways}")
    try:
        return download_dataset(default_cache_dir(), dataset)
    except DataSourceError:
        raise
    except OSError as error:
        raise DataSourceError(f"{spec.title} not found and the download failed ({error}). "
                              f"To provide the data: {ways}") from error


def _read_lines(path: Path, encoding: str):
    with open(path, encoding=encoding) as handle:
        for line_number, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if line:
                yield line_number, line


def read_ratings(path: Path) -> np.ndarray:
    rows = []
    for line_number, line in _read_lines(path, "ascii"):
        fields = line.split("\t")
        try:
            if len(fields) != 4:
                raise ValueError(f"expected 4 tab-separated fields, got {len(fields)}")
            user, item, rating, timestamp = (int(value) for value in fields)
            if not 1 <= rating <= 5:
                raise ValueError(f"rating {rating} is outside 1..5")
        except ValueError as error:
            raise DataFormatError(f"{path}:{line_number}: {error}: {line!r}") from None
        rows.append((user, item, rating, timestamp))
    if not rows:
        raise DataFormatError(f"{path}: no ratings")
    return np.asarray(rows, dtype=np.int64)


def read_items(path: Path) -> dict[str, Item]:
    items = {}
    for line_number, line in _read_lines(path, "latin-1"):
        fields = line.split("|")
        flags = fields[5:]
        if len(fields) != 5 + len(GENRES) or not fields[0].isdigit() or any(f not in ("0", "1") for f in flags):
            raise DataFormatError(
                f"{path}:{line_number}: expected id|title|release date|video date|url|{len(GENRES)} genre flags: {line!r}"
            )
        genres = tuple(name for name, flag in zip(GENRES, flags) if flag == "1")
        items[fields[0]] = Item(fields[0], fields[1], fields[2], genres)
    return items


def read_users(path: Path) -> dict[str, User]:
    users = {}
    for line_number, line in _read_lines(path, "latin-1"):
        fields = line.split("|")
        if len(fields) != 5 or not fields[0].isdigit() or not fields[1].isdigit():
            raise DataFormatError(f"{path}:{line_number}: expected id|age|gender|occupation|zip: {line!r}")
        users[fields[0]] = User(fields[0], int(fields[1]), fields[2], fields[3], fields[4])
    return users


def _decoded_lines(handle, encoding: str, progress: Progress | None):
    """A binary file's lines as text, telling `progress` the bytes read (every PROGRESS_LINES lines)."""
    read = 0
    for number, line in enumerate(handle, start=1):
        read += len(line)
        if progress is not None and number % PROGRESS_LINES == 0:
            progress.advance(read)
            read = 0
        yield line.decode(encoding)


def _rows(path: Path, encoding: str, separator: str, field_count: int, header: str | None = None):
    """(line number, fields) of a delimited file, failing with the file and line on a bad one.
    Files over PROGRESS_BYTES show their reading's progress."""
    if separator == ",":
        size = path.stat().st_size
        progress = Progress(f"reading {path.name}", size, "bytes") if size > PROGRESS_BYTES else None
        with open(path, "rb") as handle:
            lines = _decoded_lines(handle, encoding, progress)
            for line_number, fields in enumerate(csv.reader(lines), start=1):
                if line_number == 1 and header is not None:
                    if ",".join(fields) != header:
                        raise DataFormatError(f"{path}:1: expected the header {header!r}, got {','.join(fields)!r}")
                    continue
                if len(fields) != field_count:
                    raise DataFormatError(f"{path}:{line_number}: expected {field_count} fields: {fields!r}")
                yield line_number, fields
        if progress is not None:
            progress.close()
        return
    for line_number, line in _read_lines(path, encoding):
        fields = line.split(separator)
        if len(fields) != field_count:
            raise DataFormatError(f"{path}:{line_number}: expected {field_count} {separator!r}-separated fields: "
                                  f"{line!r}")
        yield line_number, fields


def read_ratings_table(path: Path, separator: str, rating_scale: float, header: str | None = None) -> np.ndarray:
    """user, movie, rating, timestamp rows; the rating is stored in units of `rating_scale` stars."""
    rows = []
    for line_number, fields in _rows(path, "utf-8", separator, 4, header):
        try:
            units = float(fields[2]) / rating_scale
            if units != int(units) or not 0 < units * rating_scale <= 5:
                raise ValueError(f"rating {fields[2]} is not a multiple of {rating_scale} in (0, 5]")
            rows.append((int(fields[0]), int(fields[1]), int(units), int(fields[3])))
        except ValueError as error:
            raise DataFormatError(f"{path}:{line_number}: {error}: {fields!r}") from None
    if not rows:
        raise DataFormatError(f"{path}: no ratings")
    return np.asarray(rows, dtype=np.int64)


def check_id(path: Path, line_number: int, what: str, identifier: str) -> None:
    if not 1 <= len(identifier) <= MAX_ID_LENGTH:
        raise DataFormatError(f"{path}:{line_number}: {what} id {identifier!r} is not 1 to {MAX_ID_LENGTH} characters")
    if "\x00" in identifier:
        raise DataFormatError(f"{path}:{line_number}: {what} id {identifier!r} holds a NUL character")


def read_movies_table(path: Path, separator: str, encoding: str, header: str | None = None,
                      numeric_ids: bool = True) -> dict[str, Item]:
    """movie id, title, "|"-separated genres (ML-1M's movies.dat, ML-20M/25M's movies.csv, the CSV format's
    items file, whose ids may be any string)."""
    items = {}
    for line_number, fields in _rows(path, encoding, separator, 3, header):
        if numeric_ids and not fields[0].isdigit():
            raise DataFormatError(f"{path}:{line_number}: movie id {fields[0]!r} is not a number")
        check_id(path, line_number, "movie", fields[0])
        if fields[0] in items:
            raise DataFormatError(f"{path}:{line_number}: movie id {fields[0]!r} is listed twice")
        genres = tuple(g for g in fields[2].split("|") if g and g != "(no genres listed)")
        items[fields[0]] = Item(fields[0], fields[1], "", genres)
    return items


def read_ml1m_users(path: Path) -> dict[str, User]:
    users = {}
    for line_number, fields in _rows(path, "latin-1", "::", 5):
        if not fields[0].isdigit() or not fields[2].isdigit():
            raise DataFormatError(f"{path}:{line_number}: expected UserID::Gender::Age::Occupation::Zip-code")
        users[fields[0]] = User(fields[0], int(fields[2]), fields[1], fields[3], fields[4])
    return users


@dataclass(frozen=True)
class DatasetSpec:
    title: str
    url: str
    sha256: str
    required_files: tuple[str, ...]
    rating_scale: float
    # The ratings file as delimited text: read whole (`read_ratings`) or streamed (export/examples.py).
    ratings_file: str
    separator: str
    header: str | None
    read_catalog: Callable[[Path], tuple[dict[str, Item], dict[str, User]]]
    # Whether training streams the ratings through tf.data by default instead of loading them.
    stream_by_default: bool = False
    # A reader of its own for the ratings file; by default `read_ratings_table` with the fields above.
    ratings_reader: Callable[[Path], np.ndarray] | None = None

    def read_ratings(self, directory: Path) -> np.ndarray:
        if self.ratings_reader is not None:
            return self.ratings_reader(directory / self.ratings_file)
        return read_ratings_table(directory / self.ratings_file, self.separator, self.rating_scale, self.header)


GROUPLENS = "https://files.grouplens.org/datasets/movielens"


def _csv_spec(name: str, title: str, sha256: str) -> DatasetSpec:
    return DatasetSpec(
        title, f"{GROUPLENS}/{name}.zip", sha256, ("ratings.csv", "movies.csv"), 0.5, "ratings.csv", ",",
        "userId,movieId,rating,timestamp",
        lambda directory: (read_movies_table(directory / "movies.csv", ",", "utf-8", header="movieId,title,genres"),
                           {}),
        stream_by_default=True)


# A catalog of one's own (`--dataset csv --ratings FILE --items FILE`): two CSV files with these headers.
# Ids are any UTF-8 strings of 1 to 128 characters (no NUL); ratings are stars from 0.5 to 5 in steps
# of 0.5; timestamps Unix seconds; genres are "|"-separated (may be empty).
CSV_RATINGS_HEADER = "user_id,item_id,rating,timestamp"
CSV_ITEMS_HEADER = "item_id,title,genres"


DATASETS: dict[str, DatasetSpec] = {
    "ml-100k": DatasetSpec(
        "MovieLens 100k", ML100K_URL, ML100K_SHA256, REQUIRED_FILES, 1.0, "u.data", "\t", None,
        lambda directory: (read_items(directory / "u.item"), read_users(directory / "u.user")),
        ratings_reader=read_ratings),  # stricter: whole stars 1..5, messages quote the raw line
    "ml-1m": DatasetSpec(
        "MovieLens 1M", f"{GROUPLENS}/ml-1m.zip", "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
        ("ratings.dat", "movies.dat", "users.dat"), 1.0, "ratings.dat", "::", None,
        lambda directory: (read_movies_table(directory / "movies.dat", "::", "latin-1"),
                           read_ml1m_users(directory / "users.dat"))),
    "ml-20m": _csv_spec("ml-20m", "MovieLens 20M", "96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3"),
    "ml-25m": _csv_spec("ml-25m", "MovieLens 25M", "8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa"),
    # One's own catalog: read by `load_csv` from two named files, never downloaded or streamed.
    "csv": DatasetSpec("CSV catalog", "", "", (), 0.5, "", ",", CSV_RATINGS_HEADER, lambda directory: ({}, {})),
}


def read_csv_ratings(path: Path, items: dict[str, Item]) -> tuple[np.ndarray, IdNames]:
    """The CSV format's ratings, ids any string of 1 to 128 characters: rows of codes, and the names.

    Kept compact while reading (an array of int64, not a list of tuples), so a file of tens of millions
    of rows costs its rows' 32 bytes each. A malformed row fails naming the file and line."""
    item_names = sorted(items, key=id_sort_key)
    item_code = {item_id: code for code, item_id in enumerate(item_names)}
    user_code: dict[str, int] = {}
    flat = array("q")
    scale = DATASETS["csv"].rating_scale
    for line_number, (user, item, rating, timestamp) in _rows(path, "utf-8", ",", 4, CSV_RATINGS_HEADER):
        try:
            units = float(rating) / scale
            if units != int(units) or not 0 < units * scale <= 5:
                raise ValueError(f"rating {rating} is not a multiple of {scale} in (0, 5]")
            seconds = int(timestamp)
        except ValueError as error:
            raise DataFormatError(f"{path}:{line_number}: {error}: {[user, item, rating, timestamp]!r}") from None
        code = user_code.get(user)
        if code is None:
            check_id(path, line_number, "user", user)
            code = user_code[user] = len(user_code)
        movie = item_code.get(item)
        if movie is None:
            raise DataFormatError(f"{path}:{line_number}: movie id {item!r} is not in the items file")
        flat.extend((code, movie, int(units), seconds))
    if not flat:
        raise DataFormatError(f"{path}: no ratings")
    rows = np.frombuffer(flat, dtype=np.int64).reshape(-1, 4).copy()
    del flat
    # Codes in id order, so that users sort the same way by code and by id.
    first_seen = list(user_code)
    order = sorted(range(len(first_seen)), key=lambda code: id_sort_key(first_seen[code]))
    recode = np.empty(len(order), np.int64)
    recode[order] = np.arange(len(order))
    rows[:, 0] = recode[rows[:, 0]]
    return rows, IdNames(np.array([first_seen[code] for code in order], dtype=object).astype(str),
                         np.array(item_names, dtype=object).astype(str))


def load_csv(ratings_file: str | os.PathLike, items_file: str | os.PathLike) -> MovieLens:
    """A catalog of one's own in the documented CSV format; a malformed row fails naming file and line."""
    ratings_path, items_path = Path(ratings_file), Path(items_file)
    for path in (ratings_path, items_path):
        if not path.is_file():
            raise DataSourceError(f"{path} is not a file")
    items = read_movies_table(items_path, ",", "utf-8", header=CSV_ITEMS_HEADER, numeric_ids=False)
    ratings, names = read_csv_ratings(ratings_path, items)
    return MovieLens(ratings=ratings, items=items, users={}, source=ratings_path.parent,
                     rating_scale=DATASETS["csv"].rating_scale, dataset="csv", names=names)


def load_movielens(data_dir: str | os.PathLike | None = None, dataset: str = "ml-100k",
                   with_ratings: bool = True) -> MovieLens:
    """The data set; `with_ratings=False` reads only movies and users, for training that streams the ratings."""
    spec = DATASETS[dataset]
    directory = resolve_data_dir(data_dir, dataset=dataset)
    items, users = spec.read_catalog(directory)
    ratings = spec.read_ratings(directory) if with_ratings else None
    if ratings is not None:
        check_rated_movies_known(directory, np.unique(ratings[:, 1]), items)
    return MovieLens(ratings=ratings, items=items, users=users, source=directory, rating_scale=spec.rating_scale,
                     dataset=dataset)


def check_rated_movies_known(directory: Path, rated_item_ids: np.ndarray, items: dict[str, Item]) -> None:
    unknown = set(map(str, rated_item_ids.tolist())) - items.keys()
    if unknown:
        raise DataFormatError(f"{directory}: rated movie ids missing from the movie list: {sorted(unknown)[:5]}")


VALIDATION_FRACTION = 0.1
VALIDATION_SEED = 7
# The row splits ("random" protocol) and the user splits ("fold-in" protocol, strong generalisation:
# Liang et al. 2018, Steck 2019): whole users held out of training, 80% of each one's ratings sent
# with the request, the other 20% the targets.
ROW_HOLDOUTS = ("test", "validation")
USER_HOLDOUTS = ("users", "users-validation")
HOLDOUTS = ROW_HOLDOUTS + USER_HOLDOUTS
# How an export is scored (export/evaluate.py): "random" and "recent" on a row holdout's export,
# "fold-in" on a user holdout's.
PROTOCOLS = ("random", "fold-in", "recent")
HELD_OUT_USER_FRACTION = 0.2
USERS_SEED = 13
FOLD_IN_FRACTION = 0.8
FOLD_IN_SEED = 29


def split_row_numbers(row_count: int, holdout: str) -> tuple[np.ndarray, np.ndarray]:
    """The project's one row split, as 0-based row numbers in file order: (rows to fit on, rows to score against).

    "test": a seeded permutation of the rows, the first 80% train and the rest test (reported numbers).
    "validation": train minus a validation split carved out of it (10%, seeded), for tuning; test is
    never touched. Row numbers rather than rows, so a file too large for memory is split the same way.
    """
    permutation = np.random.default_rng(SPLIT_SEED).permutation(row_count)
    cut = round(row_count * TRAIN_FRACTION)
    train, test = permutation[:cut], permutation[cut:]
    if holdout == "test":
        return train, test
    if holdout == "validation":
        carve = np.random.default_rng(VALIDATION_SEED).permutation(len(train))
        fit_count = int(len(train) * (1 - VALIDATION_FRACTION))
        return train[carve[:fit_count]], train[carve[fit_count:]]
    if holdout in USER_HOLDOUTS:
        raise ValueError(f"the {holdout!r} holdout splits users, which needs the ratings in memory (not --stream)")
    raise ValueError(f"holdout must be one of {HOLDOUTS}, got {holdout!r}")


def held_out_users(user_column: np.ndarray, holdout: str) -> np.ndarray:
    """The users a user holdout keeps out of training, sorted.

    "users": 20% of all users (seeded), the test users of the fold-in protocol.
    "users-validation": 20% of the others, for tuning; the test users stay out of training too.
    """
    users = np.unique(user_column)
    permutation = np.random.default_rng(USERS_SEED).permutation(len(users))
    cut = round(len(users) * HELD_OUT_USER_FRACTION)
    if holdout == "users":
        return np.sort(users[permutation[:cut]])
    if holdout == "users-validation":
        rest = users[permutation[cut:]]
        carve = np.random.default_rng(VALIDATION_SEED).permutation(len(rest))
        return np.sort(rest[carve[:round(len(rest) * HELD_OUT_USER_FRACTION)]])
    raise ValueError(f"user holdout must be one of {USER_HOLDOUTS}, got {holdout!r}")


def popularity_order(item_ids: Iterable[str], rating_counts: Mapping[str, int]) -> list[str]:
    """Most rated first, ties by movie id (numeric where ids are numbers): the served fallback's
    order and the popularity baseline's, so the two cannot differ."""
    return sorted(item_ids, key=lambda item_id: (-rating_counts.get(item_id, 0), id_sort_key(item_id)))


def fit_and_held_out(ratings: np.ndarray, holdout: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows to train on and rows to score against. Row holdouts: `split_row_numbers`. User holdouts:
    every row of the held-out users is held out (`fold_in_and_targets` splits them), and with
    "users-validation" the test users' rows are in neither part."""
    if holdout not in USER_HOLDOUTS:
        fit, held_out = split_row_numbers(len(ratings), holdout)
        return ratings[fit], ratings[held_out]
    excluded = np.isin(ratings[:, 0], held_out_users(ratings[:, 0], "users"))
    held = np.isin(ratings[:, 0], held_out_users(ratings[:, 0], holdout))
    return ratings[~excluded & ~held], ratings[held]


def group_rows(rows: np.ndarray) -> list[np.ndarray]:
    """`rows` split by user (column 0), users in code order, each user's rows in the order they had."""
    if not len(rows):
        return []
    ordered = rows[np.argsort(rows[:, 0], kind="stable")]
    return np.split(ordered, np.flatnonzero(np.diff(ordered[:, 0])) + 1)


def fold_in_and_targets(held_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each held-out user's rows, split per user (seeded, in user order): 80% sent with the request as
    interactions, the rest the targets to find."""
    rng = np.random.default_rng(FOLD_IN_SEED)
    fold_in, targets = [], []
    for rows in group_rows(held_out):
        permutation = rng.permutation(len(rows))
        cut = round(len(rows) * FOLD_IN_FRACTION)
        fold_in.append(rows[permutation[:cut]])
        targets.append(rows[permutation[cut:]])
    empty = np.zeros((0, held_out.shape[1]), held_out.dtype)
    return np.concatenate(fold_in or [empty]), np.concatenate(targets or [empty])
