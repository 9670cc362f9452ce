"""Interactions recorded through the service (the interaction store), as training data for the next version.

Every stored rating joins the fit rows: users the data set does not know join the vocabulary, so the
next version serves them from their own towers. What cannot be trained on is counted and skipped:
movies outside the catalog, rating-less interactions (training learns from stars), and (user, movie)
pairs the data set already holds, in any split (the evaluation split stays the data set's own rows).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from export.data import MovieLens
from export.examples import ExtraRows
from server.store import describe, open_store


@dataclass(frozen=True)
class StoredRatings:
    rows: ExtraRows
    new_users: int  # users the data set does not know
    unknown_movies: int
    unrated: int
    in_data_set: int

    def summary(self) -> str:
        return (f"{len(self.rows.user_ids)} stored ratings added ({self.new_users} users new to the data set); "
                f"skipped: {self.unknown_movies} of movies outside the catalog, {self.unrated} without a rating, "
                f"{self.in_data_set} already in the data set")


def stored_ratings(location: str, data: MovieLens) -> StoredRatings:
    """What the store at `location` (an SQLite path or a postgresql:// URL) adds to training on `data`."""
    store = open_store(location)
    try:
        rows = list(store.export())
    finally:
        store.close()
    in_data = set(zip(data.names.user_ids(data.ratings[:, 0]), data.names.item_ids(data.ratings[:, 1])))
    known_users = set(data.names.user_ids(np.unique(data.ratings[:, 0])))
    item_code = {item_id: code for code, item_id in enumerate(data.names.items.tolist())}
    kept, unknown, unrated, duplicate = [], 0, 0, 0
    for user_id, item_id, rating, _ in rows:
        if item_id not in data.items:
            unknown += 1
        elif not rating:
            unrated += 1
        elif (user_id, item_id) in in_data:
            duplicate += 1
        else:
            kept.append((user_id, item_code[item_id], rating))
    extra = ExtraRows(np.array([user for user, _, _ in kept], dtype=str),
                      np.array([item for _, item, _ in kept], dtype=np.int64),
                      np.array([stars for _, _, stars in kept], dtype=np.float32))
    print(f"interaction store {describe(location)}: {len(rows)} stored interactions", flush=True)
    return StoredRatings(extra, len({user for user, _, _ in kept} - known_users), unknown, unrated, duplicate)
