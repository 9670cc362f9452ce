"""A synthetic ratings data set with structure a model can learn, at any size: `python -m recsys.export synth`.

No larger real data set can be fetched where this project is built and tested, so training at a
real catalog's size is measured on data made here. What is planted:
- latent tastes: every movie belongs to one of `topics` topics, and each topic has its own genres;
  each user's taste is a sparse mixture of topics (Dirichlet with a small concentration);
- Zipf-like popularity: within a topic and overall, movie i of popularity rank r is chosen with
  weight 1 / (r + 10) ** 0.9;
- log-normal user activity, at least `MIN_RATINGS_PER_USER` ratings each, scaled to `ratings` in all;
- sessions in time: a user's ratings come in sessions (about 6 ratings each, minutes apart, days
  between sessions); each session draws one topic from the user's taste (or, with the user's own
  "mainstream" probability, the whole catalog by popularity);
- ratings that follow taste plus noise: stars = 3.2 + 0.5 x movie quality + 0.9 x how much of the
  user's taste the movie's topic holds (on a log scale, clipped) + N(0, 0.7), in half stars.

It writes either the documented CSV format (`--format csv`, string ids: "user-<hex>", "sku-<hex>")
or ML-25M's (`--format ml-25m`, integer ids from 1), which `python -m recsys.export train` reads as they are.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recsys.export.data import CSV_ITEMS_HEADER, CSV_RATINGS_HEADER

MIN_RATINGS_PER_USER = 20
FORMATS = ("csv", "ml-25m")
GENRE_NAMES = ("Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
               "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western", "IMAX")
SESSION_LENGTH = 6
FIRST_TIMESTAMP = 946_684_800  # 2000-01-01
LAST_START = 1_577_836_800  # 2020-01-01
WRITE_CHUNK = 1_000_000


@dataclass(frozen=True)
class Synthetic:
    """Parallel columns, one row per rating (user and movie as codes 0..n-1), and each movie's topic."""

    users: np.ndarray  # int64 [ratings]
    items: np.ndarray  # int64 [ratings]
    stars: np.ndarray  # float32 [ratings], 0.5..5 in halves
    timestamps: np.ndarray  # int64 [ratings]
    item_topics: np.ndarray  # int64 [movies]
    topic_genres: list[tuple[str, ...]]
    user_count: int
    item_count: int


def default_topics(item_count: int) -> int:
    return int(np.clip(item_count // 250, 8, 64))


def _zipf_weights(count: int, rng: np.random.Generator) -> np.ndarray:
    ranks = rng.permutation(count)
    return 1.0 / (ranks + 10.0) ** 0.9


def _user_activity(user_count: int, item_count: int, rating_count: int, rng: np.random.Generator) -> np.ndarray:
    """Ratings per user: log-normal, at least MIN_RATINGS_PER_USER, summing to about `rating_count`."""
    cap = max(MIN_RATINGS_PER_USER, item_count // 2)
    raw = rng.lognormal(0.0, 1.0, user_count)
    spare = max(rating_count - MIN_RATINGS_PER_USER * user_count, 0)
    counts = MIN_RATINGS_PER_USER + np.floor(raw / raw.sum() * spare).astype(np.int64)
    return np.minimum(counts, cap)


def _categorical_rows(cumulative: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per entry of `rows` from the row's distribution (its cumulative sums), chunked."""
    out = np.empty(len(rows), np.int64)
    for start in range(0, len(rows), 500_000):
        chunk = rows[start:start + 500_000]
        draws = rng.random(len(chunk))[:, None]
        out[start:start + len(chunk)] = np.minimum((cumulative[chunk] < draws).sum(axis=1), cumulative.shape[1] - 1)
    return out


def _draw_items(topics: np.ndarray, item_topics: np.ndarray, popularity: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
    """A movie per draw: from its topic by popularity, or (topic -1) from the whole catalog by popularity."""
    topic_count = int(item_topics.max()) + 1
    by_topic = np.argsort(item_topics, kind="stable")
    weights = popularity[by_topic]
    sums = np.bincount(item_topics, weights=popularity, minlength=topic_count)
    # Each topic's block of the cumulative sums spans [topic, topic + 1).
    cumulative = item_topics[by_topic] + (np.cumsum(weights) - np.repeat(np.cumsum(sums) - sums,
                                                                         np.bincount(item_topics, minlength=topic_count))
                                          ) / sums[item_topics[by_topic]]
    overall = np.cumsum(popularity) / popularity.sum()
    items = np.empty(len(topics), np.int64)
    in_topic = topics >= 0
    targets = topics[in_topic] + rng.random(int(in_topic.sum()))
    items[in_topic] = by_topic[np.minimum(np.searchsorted(cumulative, targets), len(by_topic) - 1)]
    items[~in_topic] = np.minimum(np.searchsorted(overall, rng.random(int((~in_topic).sum()))), len(overall) - 1)
    return items


def generate(user_count: int, item_count: int, rating_count: int, seed: int = 0, topics: int | None = None
             ) -> Synthetic:
    """About `rating_count` ratings (each user rates a movie at most once) with the structure above."""
    if user_count < 1 or item_count < 2 * MIN_RATINGS_PER_USER or rating_count < MIN_RATINGS_PER_USER * user_count:
        raise ValueError(f"need at least 1 user, {2 * MIN_RATINGS_PER_USER} movies and {MIN_RATINGS_PER_USER} "
                         f"ratings per user; got {user_count} users, {item_count} movies, {rating_count} ratings")
    rng = np.random.default_rng(seed)
    topic_count = topics or default_topics(item_count)
    item_topics = rng.integers(0, topic_count, item_count)
    topic_genres = [tuple(sorted(rng.choice(GENRE_NAMES, size=int(rng.integers(1, 4)), replace=False).tolist()))
                    for _ in range(topic_count)]
    popularity = _zipf_weights(item_count, rng)
    quality = rng.normal(0.0, 1.0, item_count)
    taste = rng.dirichlet(np.full(topic_count, 0.15), user_count)
    mainstream = rng.beta(2.0, 8.0, user_count)
    wanted = _user_activity(user_count, item_count, rating_count, rng)
    users, items, timestamps = _draw_ratings(wanted, taste, mainstream, item_topics, popularity, rng)
    liking = np.clip(np.log(taste[users, item_topics[items]] * topic_count + 0.05) / 2.0, -1.0, 1.0)
    stars = 3.2 + 0.5 * quality[items] + 0.9 * liking + rng.normal(0.0, 0.7, len(users))
    stars = np.clip(np.round(stars * 2) / 2, 0.5, 5.0).astype(np.float32)
    order = rng.permutation(len(users))  # files are in no particular order
    return Synthetic(users[order], items[order], stars[order], timestamps[order], item_topics, topic_genres,
                     user_count, item_count)


def _draw_sessions(draws: np.ndarray, taste: np.ndarray, mainstream: np.ndarray, item_topics: np.ndarray,
                   popularity: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`draws[u]` (user, movie, timestamp) draws per user in sessions, user-major."""
    user_count = len(draws)
    users = np.repeat(np.arange(user_count), draws)
    first = np.r_[0, np.cumsum(draws)[:-1]][draws > 0]
    new_session = rng.random(len(users)) < 1.0 / SESSION_LENGTH
    new_session[first] = True
    session_user = users[new_session]
    session_topic = _categorical_rows(np.cumsum(taste, axis=1), session_user, rng)
    session_topic[rng.random(len(session_user)) < mainstream[session_user]] = -1
    session_of_draw = np.cumsum(new_session) - 1
    items = _draw_items(session_topic[session_of_draw], item_topics, popularity, rng)
    # Sessions days apart from the user's start, ratings minutes apart within one.
    session_start = (rng.integers(FIRST_TIMESTAMP, LAST_START, user_count)[session_user]
                     + _within_user_cumsum(rng.exponential(7 * 86_400, len(session_user)), session_user))
    timestamps = (session_start[session_of_draw] + _within_user_cumsum(rng.integers(30, 600, len(users)),
                                                                       session_of_draw)).astype(np.int64)
    return users, items, timestamps


def _draw_ratings(wanted: np.ndarray, taste: np.ndarray, mainstream: np.ndarray, item_topics: np.ndarray,
                  popularity: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each user's `wanted` distinct movies, drawn in rounds: a heavy user can exhaust their topics, so
    each later round draws the shortfall again with a taste nearer uniform."""
    users = items = timestamps = np.zeros(0, np.int64)
    need = wanted
    for round_number in range(6):
        blend = min(0.25 * round_number, 1.0)
        mixed = (1.0 - blend) * taste + blend / taste.shape[1]
        drawn = _draw_sessions(np.where(need > 0, np.ceil(need * 1.25).astype(np.int64) + 2, 0), mixed, mainstream,
                               item_topics, popularity, rng)
        order = np.argsort(np.concatenate([users, drawn[0]]), kind="stable")
        users, items, timestamps = (np.concatenate([old, new])[order]
                                    for old, new in zip((users, items, timestamps), drawn))
        keep = _first_distinct(users, items, len(item_topics), wanted)
        users, items, timestamps = users[keep], items[keep], timestamps[keep]
        need = wanted - np.bincount(users, minlength=len(wanted))
        if need.sum() <= 0.001 * wanted.sum():
            break
    return users, items, timestamps


def _within_user_cumsum(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Running sums of `values` restarting at each new value of the sorted `groups`."""
    total = np.cumsum(values)
    starts = np.r_[True, groups[1:] != groups[:-1]]
    offsets = np.maximum.accumulate(np.where(starts, total - values, 0))
    return total - offsets


def _first_distinct(users: np.ndarray, items: np.ndarray, item_count: int, wanted: np.ndarray) -> np.ndarray:
    """Draw indices to keep: each (user, movie) once, at most `wanted[user]` per user, in draw order."""
    _, first = np.unique(users * item_count + items, return_index=True)
    first.sort()
    kept_users = users[first]
    rank = np.arange(len(first)) - np.searchsorted(kept_users, kept_users)
    return first[rank < wanted[kept_users]]


def _hex_ids(prefix: str, count: int, rng: np.random.Generator) -> list[str]:
    """`count` distinct ids "<prefix><12 hex digits>"."""
    numbers = np.unique(rng.integers(0, 16**12, count + count // 10 + 16))
    numbers = rng.permutation(numbers)[:count]
    return [f"{prefix}{number:012x}" for number in numbers.tolist()]


def write(data: Synthetic, out: Path, data_format: str = "csv", seed: int = 0) -> dict[str, Path]:
    """Write `data` in `data_format`; return the files written by role ("ratings", "items")."""
    if data_format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {data_format!r}")
    out.mkdir(parents=True, exist_ok=True)
    if data_format == "csv":
        rng = np.random.default_rng(seed + 1)
        user_names, item_names = _hex_ids("user-", data.user_count, rng), _hex_ids("sku-", data.item_count, rng)
        files = {"ratings": out / "ratings.csv", "items": out / "items.csv"}
        headers = (CSV_RATINGS_HEADER, CSV_ITEMS_HEADER)
    else:
        user_names = [str(n + 1) for n in range(data.user_count)]
        item_names = [str(n + 1) for n in range(data.item_count)]
        files = {"ratings": out / "ratings.csv", "items": out / "movies.csv"}
        headers = ("userId,movieId,rating,timestamp", "movieId,title,genres")
    with open(files["ratings"], "w", encoding="utf-8") as handle:
        handle.write(headers[0] + "\n")
        users, items = np.asarray(user_names), np.asarray(item_names)
        for start in range(0, len(data.users), WRITE_CHUNK):
            part = slice(start, start + WRITE_CHUNK)
            handle.write("".join(f"{user},{item},{stars:g},{timestamp}\n" for user, item, stars, timestamp in zip(
                users[data.users[part]].tolist(), items[data.items[part]].tolist(), data.stars[part].tolist(),
                data.timestamps[part].tolist())))
    with open(files["items"], "w", encoding="utf-8") as handle:
        handle.write(headers[1] + "\n")
        handle.write("".join(f"{name},Synthetic title {n + 1} (topic {topic}),{'|'.join(data.topic_genres[topic])}\n"
                             for n, (name, topic) in enumerate(zip(item_names, data.item_topics.tolist()))))
    return files


def synthesize(user_count: int, item_count: int, rating_count: int, out: Path, seed: int = 0,
               data_format: str = "csv") -> dict[str, Path]:
    """Generate and write, printing what was made and how long it took."""
    started = time.perf_counter()
    data = generate(user_count, item_count, rating_count, seed)
    print(f"generated {len(data.users):,} ratings of {user_count:,} users on {item_count:,} movies "
          f"({len(data.topic_genres)} topics) in {time.perf_counter() - started:.1f}s", flush=True)
    started = time.perf_counter()
    files = write(data, out, data_format, seed)
    print(f"wrote {', '.join(str(path) for path in files.values())} in {time.perf_counter() - started:.1f}s",
          flush=True)
    return files
