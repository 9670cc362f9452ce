"""What an export's tables cost in memory, by what they grow with: `python -m recsys.export sizes`.

The server holds each SavedModel's variables in memory (twice during a hot swap), so an export's
resident cost is the sum of its variables. Each is put in one kind by its shape: a row per user
(the towers' per-user tables), per movie, per movie pair (the ranker's dense item-item weights),
per rating (the values of the users' history tables), or other (the layers' weights).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

from recsys.server.layout import RANKING_MODEL, RETRIEVAL_MODEL, complete_versions

KINDS = ("per user", "per movie", "per movie pair", "per rating", "other")


@dataclass(frozen=True)
class ModelSizes:
    model: str
    bytes_by_kind: dict[str, int]
    units: dict[str, int]  # users, movies, movie pairs, ratings: what each kind's bytes are divided by

    def per_unit(self, kind: str) -> float:
        return self.bytes_by_kind.get(kind, 0) / max(self.units.get(kind, 0), 1)


def _kind(name: str, shape: list[int], users: int, movies: int) -> str:
    rows = shape[0] if shape else 0
    if name.endswith("/values") and len(shape) == 1:
        return "per rating"
    if name.split("/")[0] in ("index", "neighbours"):  # a partitioned index holds its movies by cell
        return "per movie"
    if len(shape) == 2 and shape[0] in (movies, movies + 1) and shape[1] in (movies, movies + 1):
        return "per movie pair"
    if rows in (users, users + 1, users + 2):  # + the out-of-vocabulary row, + a ragged table's first split
        return "per user"
    if rows in (movies, movies + 1, movies + 2):
        return "per movie"
    return "other"


def _counts(shapes: dict[str, list[int]]) -> tuple[int, int]:
    """Users and movies, read off the retrieval model's own tables: its history's row splits (one
    more than rows, whose first is the out-of-vocabulary id's) and its movie ids ("" first)."""
    def shape_of(table: str) -> list[int]:
        return next(shape for name, shape in shapes.items() if name.startswith(table + "/"))
    return shape_of("history/positions/row_splits")[0] - 2, shape_of("movie_ids")[0] - 1


def model_sizes(models_dir: Path, version: int | None = None) -> list[ModelSizes]:
    """Both models' variables of `version` (default: the newest complete one), summed by kind."""
    versions = complete_versions(models_dir)
    if not versions or version is not None and version not in versions:
        raise FileNotFoundError(f"{models_dir} holds no complete version {version or ''}".rstrip())
    version = version or versions[-1]
    readers = {model: tf.train.load_checkpoint(str(models_dir / model / str(version) / "variables" / "variables"))
               for model in (RETRIEVAL_MODEL, RANKING_MODEL)}
    users, movies = _counts(readers[RETRIEVAL_MODEL].get_variable_to_shape_map())
    sizes = []
    for model, reader in readers.items():
        dtypes = reader.get_variable_to_dtype_map()
        by_kind: dict[str, int] = defaultdict(int)
        ratings = 0
        for name, shape in reader.get_variable_to_shape_map().items():
            if not name.endswith(".ATTRIBUTES/VARIABLE_VALUE"):
                continue  # the object graph, not a table
            kind = _kind(name.split("/.ATTRIBUTES")[0], shape, users, movies)
            size = dtypes[name].size * math.prod(shape)
            by_kind[kind] += size
            if kind == "per rating":
                ratings = max(ratings, shape[0])
        sizes.append(ModelSizes(model, dict(by_kind), {"per user": users, "per movie": movies,
                                                       "per movie pair": movies * movies, "per rating": ratings}))
    return sizes


def format_sizes(sizes: list[ModelSizes]) -> str:
    lines = ["model      kind              MiB     bytes each"]
    for entry in sizes:
        for kind in KINDS:
            if kind in entry.bytes_by_kind:
                each = f"{entry.per_unit(kind):10.1f}" if kind != "other" else ""
                lines.append(f"{entry.model:10} {kind:14} {entry.bytes_by_kind[kind] / 2**20:8.1f}   {each}")
        lines.append(f"{entry.model:10} {'total':14} {sum(entry.bytes_by_kind.values()) / 2**20:8.1f}")
    return "\n".join(lines)
