"""MovieLens 100k: find it, read it strictly, split it the one fixed way.

Every evaluation in the project uses `split_ratings`, so numbers are comparable
across presets, baselines and sessions.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
ML100K_SHA256 = "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229"
DATA_DIR_ENV = "RECSYS_DATA_DIR"
CACHE_DIR_ENV = "RECSYS_CACHE_DIR"
LOCAL_DATA_DIR = Path("data/ml-100k")
REQUIRED_FILES = ("u.data", "u.item", "u.user")
TRAIN_SIZE = 80_000
SPLIT_SEED = 42
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


@dataclass
class MovieLens:
    """Ratings as an int64 array of rows (user, item, rating, timestamp), in file order."""

    ratings: np.ndarray
    items: dict[str, Item]
    users: dict[str, User]
    source: Path = field(default=Path("."))


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "recsys")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in REQUIRED_FILES)


def download_ml100k(cache_dir: Path, url: str | None = None, sha256: str | None = None) -> Path:
    """Download and unpack ml-100k.zip into cache_dir, refusing a file whose checksum differs."""
    url, sha256 = url or ML100K_URL, sha256 or ML100K_SHA256
    target = cache_dir / "ml-100k"
    if _is_complete(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    archive = cache_dir / "ml-100k.zip"
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
    if not _is_complete(target):
        raise DataSourceError(f"{archive} does not contain ml-100k/{{{','.join(REQUIRED_FILES)}}}")
    return target


def resolve_data_dir(data_dir: str | os.PathLike | None = None, allow_download: bool = True) -> Path:
    """Find MovieLens 100k: --data-dir, then $RECSYS_DATA_DIR, then ./data/ml-100k, then download."""
    ways = (
        f"pass --data-dir DIR, set {DATA_DIR_ENV}=DIR, or place the files in ./{LOCAL_DATA_DIR} "
        f"(DIR must hold {', '.join(REQUIRED_FILES)}); otherwise ml-100k.zip is downloaded "
        f"from GroupLens into {default_cache_dir()}"
    )
    explicit = [(str(data_dir), "--data-dir")] if data_dir else []
    if os.environ.get(DATA_DIR_ENV):
        explicit.append((os.environ[DATA_DIR_ENV], DATA_DIR_ENV))
    if explicit:
        # A source the user named must work: silently falling back would train on other data.
        path, how = explicit[0]
        if _is_complete(Path(path)):
            return Path(path)
        raise DataSourceError(f"{how}={path} is not a MovieLens 100k directory. To provide the data: {ways}")
    if _is_complete(LOCAL_DATA_DIR):
        return LOCAL_DATA_DIR
    if not allow_download:
        raise DataSourceError(f"MovieLens 100k not found. To provide the data: {ways}")
    try:
        return download_ml100k(default_cache_dir())
    except DataSourceError:
        raise
    except OSError as error:
        raise DataSourceError(f"MovieLens 100k not found and the download failed ({error}). To provide the data: {ways}") from error


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


def load_movielens(data_dir: str | os.PathLike | None = None) -> MovieLens:
    directory = resolve_data_dir(data_dir)
    ratings = read_ratings(directory / "u.data")
    items = read_items(directory / "u.item")
    users = read_users(directory / "u.user")
    unknown = set(map(str, np.unique(ratings[:, 1]))) - items.keys()
    if unknown:
        raise DataFormatError(f"{directory / 'u.data'}: movie ids missing from u.item: {sorted(unknown)[:5]}")
    return MovieLens(ratings=ratings, items=items, users=users, source=directory)


def split_ratings(ratings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The project's one train/test split: a seeded permutation of the rows in file order."""
    permutation = np.random.default_rng(SPLIT_SEED).permutation(len(ratings))
    return ratings[permutation[:TRAIN_SIZE]], ratings[permutation[TRAIN_SIZE:]]


VALIDATION_FRACTION = 0.1
VALIDATION_SEED = 7
HOLDOUTS = ("test", "validation")


def carve_validation(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A validation split carved out of train (10%, seeded), for tuning; test is never touched."""
    permutation = np.random.default_rng(VALIDATION_SEED).permutation(len(train))
    cut = int(len(train) * (1 - VALIDATION_FRACTION))
    return train[permutation[:cut]], train[permutation[cut:]]


def fit_and_held_out(ratings: np.ndarray, holdout: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows to train on and rows to score against.

    "test": train / test of the fixed split (reported numbers).
    "validation": train minus the validation split / the validation split (tuning).
    """
    train, test = split_ratings(ratings)
    if holdout == "test":
        return train, test
    if holdout == "validation":
        return carve_validation(train)
    raise ValueError(f"holdout must be one of {HOLDOUTS}, got {holdout!r}")
