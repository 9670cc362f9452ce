"""Per-version metadata: titles, genres, popularity and who rated what."""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from server.errors import ModelsUnavailable
from server.layout import metadata_path


@dataclass(frozen=True)
class Catalog:
    model_version: str
    candidate_count: int
    titles: dict[str, str]
    genres: dict[str, tuple[str, ...]]
    popular_item_ids: tuple[str, ...]
    rated_item_ids: dict[str, frozenset[str]]
    preset: dict

    def is_known_user(self, user_id: str) -> bool:
        return user_id in self.rated_item_ids


def load_catalog(models_dir: Path, version: int) -> Catalog:
    raw = json.loads(metadata_path(models_dir, version).read_text())
    return Catalog(
        model_version=str(raw["model_version"]),
        candidate_count=int(raw["candidate_count"]),
        titles={item_id: item["title"] for item_id, item in raw["items"].items()},
        genres={item_id: tuple(item["genres"]) for item_id, item in raw["items"].items()},
        popular_item_ids=tuple(raw["popular_item_ids"]),
        rated_item_ids={user: frozenset(items) for user, items in raw["rated_item_ids"].items()},
        preset=raw.get("preset", {}),
    )


# Catalogs kept in memory: the version serving, the one before it (in-flight requests may still
# rank with it) and one more. A server that hot-swaps a new version every day must not keep a
# catalog (~9 MiB for ML-100k) per version it ever served.
KEPT_VERSIONS = 3


class CatalogStore:
    """Loads a version's metadata when first asked for it; the backend says which version answered.
    Beyond KEPT_VERSIONS, the least recently used catalog is dropped (asked for again, it reloads)."""

    def __init__(self, models_dir: Path):
        self.models_dir = Path(models_dir)
        self._catalogs: OrderedDict[str, Catalog] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model_version: str) -> Catalog:
        with self._lock:
            catalog = self._catalogs.get(model_version)
            if catalog is None:
                try:
                    catalog = load_catalog(self.models_dir, int(model_version))
                except (OSError, ValueError, KeyError) as error:
                    raise ModelsUnavailable(
                        f"no metadata for model version {model_version} in {self.models_dir}: {error}") from error
                self._catalogs[model_version] = catalog
                while len(self._catalogs) > KEPT_VERSIONS:
                    self._catalogs.popitem(last=False)
            self._catalogs.move_to_end(model_version)
            return catalog
