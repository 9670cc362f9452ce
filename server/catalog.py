"""Per-version metadata: titles, genres, popularity and which users the models know."""
from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from recsys.server.errors import ModelsUnavailable
from recsys.server.layout import metadata_path

log = logging.getLogger("recsys.server")


@dataclass(frozen=True)
class Catalog:
    model_version: str
    candidate_count: int
    titles: dict[str, str]
    genres: dict[str, tuple[str, ...]]
    popular_item_ids: tuple[str, ...]
    user_ids: frozenset[str]  # the users the models were trained on (who rated what: `Backend.rated_items`)
    preset: dict
    # Movies padded into the retrieval index for benchmarks (ids "synthetic-<n>", no titles).
    synthetic_items: int = 0
    # Whether the models compute users from their history, so that interactions sent with a
    # request personalise the list (false for id-only towers, e.g. the `seed` preset).
    serves_interactions: bool = False
    # The retrieval index as the export built it (export/index.py IndexSpec.build): kind, movies,
    # and for a partitioned one cells, probes and recall. Exports without the record scored every movie.
    retrieval_index: dict = field(default_factory=lambda: {"kind": "brute_force"})

    def is_known_user(self, user_id: str) -> bool:
        return user_id in self.user_ids

    def index_summary(self) -> dict:
        """The retrieval index as ModelInfo reports it."""
        index = self.retrieval_index
        return {"retrieval_index": index["kind"], "index_movies": int(index.get("movies", 0)),
                "index_cells": int(index.get("cells", 0)), "index_probes": int(index.get("probes", 0)),
                "index_recall": float(index.get("recall", 1.0))}


class InvalidMetadata(ValueError):
    """metadata/<v>.json is missing, truncated, of the wrong shape, or disagrees with its models."""


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise InvalidMetadata(what)


def _strings(values, what: str) -> list[str]:
    _expect(isinstance(values, list) and all(isinstance(value, str) for value in values), f"{what} must be a list of strings")
    return values


def load_catalog(models_dir: Path, version: int) -> Catalog:
    """Parse and check `metadata/<version>.json`: every field of the right type, and every popular
    movie in the catalog. Raises InvalidMetadata."""
    try:
        raw = json.loads(metadata_path(models_dir, version).read_text())
    except (OSError, ValueError) as error:
        raise InvalidMetadata(f"metadata of version {version} cannot be read: {error}") from None
    _expect(isinstance(raw, dict), "the metadata must be a JSON object")
    _expect(str(raw.get("model_version")) == str(version), f"model_version is {raw.get('model_version')!r}, "
                                                           f"not {version}")
    _expect(isinstance(raw.get("candidate_count"), int) and raw["candidate_count"] > 0,
            "candidate_count must be a positive integer")
    items = raw.get("items")
    _expect(isinstance(items, dict) and items, "items must be a non-empty object")
    for item_id, item in items.items():
        _expect(isinstance(item, dict) and isinstance(item.get("title"), str), f"items[{item_id!r}] needs a title")
        _strings(item.get("genres"), f"items[{item_id!r}].genres")
    popular = _strings(raw.get("popular_item_ids"), "popular_item_ids")
    unknown = [item_id for item_id in popular if item_id not in items]
    _expect(not unknown, f"popular_item_ids has movies missing from items: {unknown[:3]}")
    _expect("rated_item_ids" not in raw, "the metadata lists who rated what: an export older than this server "
                                         "(its retrieval model lacks `rated_items`); export it again")
    user_ids = _strings(raw.get("user_ids"), "user_ids")
    preset = raw.get("preset", {})
    _expect(isinstance(preset, dict), "preset must be an object")
    serves_interactions = raw.get("serves_interactions", False)
    _expect(isinstance(serves_interactions, bool), "serves_interactions must be true or false")
    indexes = raw.get("indexes", {})
    _expect(isinstance(indexes, dict), "indexes must be an object")
    retrieval_index = indexes.get("retrieval", {"kind": "brute_force"})
    _expect(isinstance(retrieval_index, dict) and retrieval_index.get("kind") in ("brute_force", "partitioned"),
            "indexes.retrieval.kind must be brute_force or partitioned")
    _expect(all(isinstance(retrieval_index.get(key, 0), (int, float)) and retrieval_index.get(key, 0) >= 0
                for key in ("movies", "cells", "probes", "recall")),
            "indexes.retrieval's movies, cells, probes and recall must be numbers, 0 or more")
    return Catalog(
        model_version=str(version),
        candidate_count=raw["candidate_count"],
        titles={item_id: item["title"] for item_id, item in items.items()},
        genres={item_id: tuple(item["genres"]) for item_id, item in items.items()},
        popular_item_ids=tuple(popular),
        user_ids=frozenset(user_ids),
        preset=preset,
        synthetic_items=int(raw.get("synthetic_items", 0) or 0),
        serves_interactions=serves_interactions,
        retrieval_index=retrieval_index,
    )


# Catalogs kept in memory: the version serving, the one before it (in-flight requests may still
# rank with it) and one more. A server that hot-swaps a new version every day must not keep a
# catalog per version it ever served.
KEPT_VERSIONS = 3


class CatalogStore:
    """Loads a version's metadata when first asked for it; the backend says which version answered.
    Beyond KEPT_VERSIONS, the least recently used catalog is dropped (asked for again, it reloads).

    Requests ask through `get` (the catalog as first read); the backend's periodic refresh asks
    through `refreshed`, which reads the file again once it has changed: metadata mended in place
    (say, after the backend refused a version whose metadata disagreed with its models) is seen at
    the next refresh, at the cost of a stat per refresh, never per request."""

    def __init__(self, models_dir: Path):
        self.models_dir = Path(models_dir)
        self._catalogs: OrderedDict[str, tuple[Catalog, tuple[int, int] | None]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model_version: str) -> Catalog:
        with self._lock:
            cached = self._catalogs.get(model_version)
            return self._load(model_version) if cached is None else self._use(model_version, cached[0])

    def refreshed(self, model_version: str) -> Catalog:
        with self._lock:
            cached = self._catalogs.get(model_version)
            if cached is None or cached[1] != self._file_state(model_version):
                return self._load(model_version)
            return self._use(model_version, cached[0])

    def _file_state(self, model_version: str) -> tuple[int, int] | None:
        try:
            stat = metadata_path(self.models_dir, int(model_version)).stat()
        except (OSError, ValueError):
            return None
        return stat.st_mtime_ns, stat.st_size

    def _use(self, model_version: str, catalog: Catalog) -> Catalog:
        self._catalogs.move_to_end(model_version)
        return catalog

    def _load(self, model_version: str) -> Catalog:
        state = self._file_state(model_version)
        try:
            catalog = load_catalog(self.models_dir, int(model_version))
        except InvalidMetadata as error:
            # The detail (it may name files) goes to the log; callers see the version only.
            log.warning("model version %s has no usable metadata in %s: %s", model_version,
                        self.models_dir, error)
            raise ModelsUnavailable(f"model version {model_version} has no usable metadata") from error
        self._catalogs[model_version] = (catalog, state)
        while len(self._catalogs) > KEPT_VERSIONS:
            self._catalogs.popitem(last=False)
        return self._use(model_version, catalog)
