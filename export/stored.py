"""Interactions recorded through the service (the interaction store), as training data for the next version.

Every stored rating joins the fit rows: users the data set does not know join the vocabulary, so the
next version serves them from their own towers. What cannot be trained on is counted and skipped:
movies outside the catalog, rating-less interactions (training learns from stars), and (user, movie)
pairs the data set already holds, in any split (the evaluation split stays the data set's own rows).
Users erased through the service (ForgetUser's tombstones) are left out of training altogether, their
rows in the data set too, so the next version no longer knows them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recsys.export.data import IdNames, MovieLens
from recsys.export.examples import ExtraRows
from recsys.server.store import describe, open_store, user_hash


@dataclass(frozen=True)
class StoredRatings:
    rows: ExtraRows
    new_users: int  # users the data set does not know
    unknown_movies: int
    unrated: int
    in_data_set: int
    forgotten: frozenset[str] = frozenset()  # erased users: none of their rows is trained on

    def summary(self) -> str:
        return (f"{len(self.rows.user_ids)} stored ratings added ({self.new_users} users new to the data set); "
                f"skipped: {self.unknown_movies} of movies outside the catalog, {self.unrated} without a rating, "
                f"{self.in_data_set} already in the data set; {len(self.forgotten)} erased users left out")

    def without_forgotten(self, rows: np.ndarray, names: IdNames) -> np.ndarray:
        """The data set's `rows` (user codes in column 0) less those of erased users."""
        if not self.forgotten:
            return rows
        erased = np.array([user in self.forgotten for user in names.users.tolist()], dtype=bool)
        return rows[~erased[rows[:, 0]]]


def stored_ratings(location: str, data: MovieLens) -> StoredRatings:
    """What the store at `location` (an SQLite path or a postgresql:// URL) adds to training on `data`."""
    store = open_store(location)
    try:
        rows = list(store.export())
        erased = store.forgotten_hashes()
    finally:
        store.close()
    in_data = set(zip(data.names.user_ids(data.ratings[:, 0]), data.names.item_ids(data.ratings[:, 1])))
    known_users = set(data.names.user_ids(np.unique(data.ratings[:, 0])))
    item_code = {item_id: code for code, item_id in enumerate(data.names.items.tolist())}
    kept, unknown, unrated, duplicate = [], 0, 0, 0
    forgotten = frozenset(user for user in data.names.users.tolist() + [row[0] for row in rows]
                          if user_hash(user) in erased)
    for user_id, item_id, rating, _ in rows:
        if user_id in forgotten:
            continue  # an erased user is left out of training, what they recorded since too
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
    return StoredRatings(extra, len({user for user, _, _ in kept} - known_users), unknown, unrated, duplicate,
                         forgotten)
