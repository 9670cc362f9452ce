"""Interactions recorded through the service (the interaction store), as training data for the next version.

Every stored rating joins the fit rows: users the data set does not know join the vocabulary, so the
next version serves them from their own towers. What cannot be trained on is counted and skipped:
movies outside the catalog, rating-less interactions (training learns from stars), and (user, movie)
pairs the data set already holds, in any split (the evaluation split stays the data set's own rows).
Users erased through the service (ForgetUser's tombstones) are left out of training altogether, their
rows in the data set too, so the next version no longer knows them.
"""
from __future__ import annotations

from array import array
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
        return (f"{len(self.rows)} stored ratings added ({self.new_users} users new to the data set); "
                f"skipped: {self.unknown_movies} of movies outside the catalog, {self.unrated} without a rating, "
                f"{self.in_data_set} already in the data set; {len(self.forgotten)} erased users left out")

    def without_forgotten(self, rows: np.ndarray, names: IdNames) -> np.ndarray:
        """The data set's `rows` (user codes in column 0) less those of erased users."""
        if not self.forgotten:
            return rows
        erased = np.array([user in self.forgotten for user in names.users.tolist()], dtype=bool)
        return rows[~erased[rows[:, 0]]]


def stored_ratings(location: str, data: MovieLens) -> StoredRatings:
    """What the store at `location` (an SQLite path or a postgresql:// URL) adds to training on `data`.

    The store is read as a stream of pages (`InteractionStore.export`): what this holds is the rows
    kept for training, and the data set's (user, movie) pairs as one int64 each."""
    store = open_store(location)
    try:
        erased = store.forgotten_hashes()
        user_code = {user_id: code for code, user_id in enumerate(data.names.users.tolist())}
        forgotten = {user for user in user_code if user_hash(user) in erased}
        item_code = {item_id: code for code, item_id in enumerate(data.names.items.tolist())}
        in_data = np.unique(data.ratings[:, 0].astype(np.int64) * len(item_code) + data.ratings[:, 1])
        kept_users: dict[str, int] = {}  # each user id once, numbered in order of appearance
        kept_user_index, kept_items, kept_stars = array("q"), array("q"), array("f")
        stored = unknown = unrated = duplicate = 0
        new_users_erased: dict[str, bool] = {}  # users only the store knows: erased or not, hashed once
        for user_id, item_id, rating, _ in store.export():
            stored += 1
            if user_id not in user_code and user_id not in new_users_erased:
                new_users_erased[user_id] = user_hash(user_id) in erased
                if new_users_erased[user_id]:
                    forgotten.add(user_id)
            if user_id in forgotten:
                continue  # an erased user is left out of training, what they recorded since too
            if item_id not in data.items:
                unknown += 1
            elif not rating:
                unrated += 1
            elif _holds(in_data, user_code.get(user_id), item_code[item_id], len(item_code)):
                duplicate += 1
            else:
                kept_user_index.append(kept_users.setdefault(user_id, len(kept_users)))
                kept_items.append(item_code[item_id])
                kept_stars.append(rating)
    finally:
        store.close()
    extra = ExtraRows(np.array(list(kept_users), dtype=str), np.frombuffer(kept_user_index, dtype=np.int64).copy(),
                      np.frombuffer(kept_items, dtype=np.int64).copy(), np.frombuffer(kept_stars, dtype=np.float32).copy())
    print(f"interaction store {describe(location)}: {stored} stored interactions", flush=True)
    return StoredRatings(extra, len(kept_users.keys() - user_code.keys()), unknown, unrated, duplicate,
                         frozenset(forgotten))


def _holds(pairs: np.ndarray, user: int | None, item: int, items: int) -> bool:
    """Whether the sorted (user code x items + movie code) keys hold the pair; users outside the data
    set hold none."""
    if user is None:
        return False
    key = user * items + item
    position = int(np.searchsorted(pairs, key))
    return position < len(pairs) and int(pairs[position]) == key
