"""A small data set in MovieLens 100k's exact file format, for the fast test tier.

Users and movies fall into taste groups; users rate mostly (and rate higher) the movies of
their own group, and popularity is skewed, so a trained model has something real to find.
Ids are numbers from 1, like MovieLens', so the tests' ids ("42", "1") exist in both.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from recsys.export.data import GENRES

USERS = 943
MOVIES = 400
GROUPS = 6


def write_synthetic_ml100k(directory: Path, seed: int = 0) -> Path:
    """u.data, u.item and u.user in ML-100k's format: ~16 ratings per user, at most 60."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    movie_group = rng.integers(0, GROUPS, MOVIES)
    popularity = 1.0 / np.arange(1, MOVIES + 1) ** 0.8
    rows = []
    for user in range(1, USERS + 1):
        group = user % GROUPS
        weights = popularity * np.where(movie_group == group, 6.0, 1.0)
        count = int(min(60, 5 + rng.geometric(1 / 12)))
        movies = rng.choice(MOVIES, size=count, replace=False, p=weights / weights.sum())
        for movie in movies:
            liked = movie_group[movie] == group
            stars = int(np.clip(rng.normal(4.2 if liked else 2.8, 0.8), 1, 5).round())
            rows.append((user, movie + 1, stars, 880_000_000 + int(rng.integers(0, 10_000_000))))
    order = rng.permutation(len(rows))
    (directory / "u.data").write_text("".join(f"{u}\t{m}\t{s}\t{t}\n" for u, m, s, t in (rows[i] for i in order)))
    with open(directory / "u.item", "w", encoding="latin-1") as out:
        for movie in range(MOVIES):
            flags = ["0"] * len(GENRES)
            flags[1 + movie_group[movie]] = "1"
            out.write(f"{movie + 1}|Synthetic movie {movie + 1} (199{movie % 10})|01-Jan-1995||"
                      f"http://example.invalid/{movie + 1}|{'|'.join(flags)}\n")
    (directory / "u.user").write_text("".join(f"{user}|{20 + user % 50}|{'MF'[user % 2]}|other|{10000 + user}\n"
                                              for user in range(1, USERS + 1)))
    return directory
