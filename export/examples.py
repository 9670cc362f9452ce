"""Training examples of the fit rows: from rows in memory, or streamed from the ratings file.

Both give training the same `FitData`. Streaming is for data sets larger than memory (ML-20M and
ML-25M by default): rows are read, split and parsed in blocks inside tf.data and never gathered
into one array. What stays in memory is one bit per row (which side of the split it is on) and the
per-user rated-movie ids and stars, which the history towers and the served exclusions are made of.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf

from recsys.export.data import (
    DEFAULT_SHUFFLE_BUFFER,
    DataFormatError,
    IdNames,
    MovieLens,
    check_rated_movies_known,
    id_sort_key,
    split_row_numbers,
)

STREAM_BLOCK_ROWS = 65_536
# Rows a shuffle of row numbers holds at once (8 bytes each): a full shuffle up to here.
MAX_SHUFFLE_ROWS = 4_000_000


@dataclass(frozen=True)
class FitData:
    """What training needs from the rows it fits on, however they are stored."""

    user_ids: list[str]  # users with fit rows, in id order
    rated_item_ids: dict[str, list[str]]  # user -> movies they rated in the fit rows
    rated_stars: dict[str, np.ndarray]  # user -> the stars they gave those movies, in the same order
    rating_counts: dict[str, int]  # movie -> how often it was rated in the fit rows
    row_count: int
    # (batch size, seed) -> batches of {"user_id", "item_id", "rating" (stars)}, in a new order every epoch.
    batches: Callable[[int, int], tf.data.Dataset]


def _summarise(users: np.ndarray, items: np.ndarray, stars: np.ndarray, names: IdNames | None = None
               ) -> tuple[list[str], dict[str, list[str]], dict[str, np.ndarray], dict[str, int]]:
    """Users, who rated what with how many stars (in row order) and rating counts, from parallel columns
    of codes (`names` turns them into ids; without it the codes are the ids)."""
    order = np.argsort(users, kind="stable")
    users, items, stars = users[order], items[order], stars[order]
    starts = np.flatnonzero(np.diff(users)) + 1
    firsts = users[np.r_[0, starts]] if len(users) else np.zeros(0, users.dtype)
    user_names = names.users if names is not None else None
    item_names = names.items if names is not None else None

    def named(codes: np.ndarray, table: np.ndarray | None) -> list[str]:
        return (table[codes] if table is not None else codes.astype(str)).tolist()

    firsts = named(firsts, user_names)
    rated = dict(zip(firsts, (named(chunk, item_names) for chunk in np.split(items, starts))))
    rated_stars = dict(zip(firsts, np.split(stars, starts)))
    movies, counts = np.unique(items, return_counts=True)
    return list(rated), rated, rated_stars, dict(zip(named(movies, item_names), counts.tolist()))


@dataclass(frozen=True)
class ExtraRows:
    """Ratings from outside the data set's files (the interaction store), trained on with the fit rows:
    user ids may be any string; movies are the data set's movie codes. Each distinct user id is held
    once (`users`), each row points at its own (`user_index`): millions of rows cost no string each."""

    users: np.ndarray  # str [distinct users]
    user_index: np.ndarray  # int64 [rows]: the row's user in `users`
    item_codes: np.ndarray  # int64 [rows]
    stars: np.ndarray  # float32 [rows]

    def __len__(self) -> int:
        return len(self.user_index)

    @property
    def user_ids(self) -> list[str]:
        """Each row's user id."""
        return self.users[self.user_index].tolist()


def _with_extra(users: np.ndarray, items: np.ndarray, stars: np.ndarray, names: IdNames, extra: ExtraRows | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, IdNames]:
    """The columns with `extra`'s rows after them; users new to the data set get codes after its own."""
    if extra is None or not len(extra):
        return users, items, stars, names
    code = {name: position for position, name in enumerate(names.users.tolist())}
    new = sorted(set(extra.users.tolist()) - code.keys(), key=id_sort_key)
    code.update((name, len(names.users) + n) for n, name in enumerate(new))
    names = IdNames(np.concatenate([names.users, np.array(new, dtype=str)]).astype(str), names.items)
    codes = np.array([code[user] for user in extra.users.tolist()], dtype=np.int64)
    return (np.concatenate([users.astype(np.int64), codes[extra.user_index]]),
            np.concatenate([items, extra.item_codes]), np.concatenate([stars, extra.stars.astype(np.float32)]), names)


def from_rows(rows: np.ndarray, rating_scale: float = 1.0, extra: ExtraRows | None = None,
              names: IdNames | None = None) -> FitData:
    """Rows already in memory (user code, movie code, rating units, timestamp), and `extra` rows after
    them. `names` turns codes into ids (by default the codes are the ids, as in MovieLens' files)."""
    if names is None:
        names = IdNames(np.arange(int(rows[:, 0].max(initial=0)) + 1).astype(str),
                        np.arange(int(rows[:, 1].max(initial=0)) + 1).astype(str))
    users, items, stars, names = _with_extra(rows[:, 0], rows[:, 1], rows[:, 2].astype(np.float32) * rating_scale,
                                             names, extra)
    row_count = len(users)

    def batches(batch_size: int, seed: int) -> tf.data.Dataset:
        # Shuffles row indices and gathers codes, then names: far cheaper than shuffling strings.
        user_names, item_names = tf.constant(names.users), tf.constant(names.items)
        user_codes, item_codes, star_column = tf.constant(users), tf.constant(items), tf.constant(stars)
        return (tf.data.Dataset.range(row_count)
                .shuffle(min(row_count, MAX_SHUFFLE_ROWS), seed=seed, reshuffle_each_iteration=True)
                .batch(batch_size)
                .map(lambda index: {"user_id": tf.gather(user_names, tf.gather(user_codes, index)),
                                    "item_id": tf.gather(item_names, tf.gather(item_codes, index)),
                                    "rating": tf.gather(star_column, index)})
                .prefetch(tf.data.AUTOTUNE))

    return FitData(*_summarise(users, items, stars, names), row_count=row_count, batches=batches)


def count_rows(path: Path, has_header: bool) -> int:
    """Data rows in a ratings file: non-blank lines, less the header."""
    with open(path, "rb") as handle:
        lines = sum(1 for line in handle if line.strip())
    return lines - int(has_header)


def stream_blocks(data: MovieLens, wanted: np.ndarray) -> tf.data.Dataset:
    """The rows whose entry in the boolean `wanted` (one per row) is set, parsed in blocks:
    int64 [rows, 3] of (user, movie, rating units). Malformed rows fail the iteration with
    InvalidArgumentError (see `row_error`).
    """
    spec = data.spec
    path = data.source / spec.ratings_file
    wanted = tf.constant(wanted)
    lines = tf.data.TextLineDataset(str(path))
    if spec.header is not None:
        lines = lines.skip(1)

    def number_rows(first_row: tf.Tensor, block: tf.Tensor):
        block = tf.strings.strip(block)
        block = tf.boolean_mask(block, tf.strings.length(block) > 0)  # blank lines are not rows
        count = tf.shape(block, out_type=tf.int64)[0]
        return first_row + count, (first_row + tf.range(count), block)

    def parse(numbers: tf.Tensor, block: tf.Tensor) -> tf.Tensor:
        fields = tf.strings.split(tf.boolean_mask(block, tf.gather(wanted, numbers)), spec.separator)
        with tf.control_dependencies([tf.debugging.assert_equal(
                fields.row_lengths(), tf.constant(4, tf.int64),
                message=f"a row does not have 4 fields separated by {spec.separator}")]):
            fields = fields.to_tensor(shape=[None, 4])
        stars = tf.strings.to_number(fields[:, 2], tf.float64)
        units = stars / spec.rating_scale
        checks = [
            tf.debugging.assert_equal(units, tf.round(units),
                                      message=f"a rating is not a multiple of {spec.rating_scale}"),
            tf.debugging.assert_positive(stars, message="a rating is not above 0"),
            tf.debugging.assert_less_equal(stars, tf.constant(5.0, tf.float64), message="a rating is above 5"),
            tf.strings.to_number(fields[:, 3], tf.int64),  # timestamps must parse, as in the in-memory reader
        ]
        with tf.control_dependencies(checks):
            # One tensor per row, not three: a shuffle buffer's memory is mostly per-tensor overhead.
            return tf.stack([tf.strings.to_number(fields[:, 0], tf.int64), tf.strings.to_number(fields[:, 1], tf.int64),
                             tf.cast(units, tf.int64)], axis=1)

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return (lines.batch(STREAM_BLOCK_ROWS)
            .scan(tf.constant(0, tf.int64), number_rows)
            .map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .with_options(options))


def row_error(error: tf.errors.InvalidArgumentError) -> str:
    """What was wrong with a streamed row, without the op and device noise around it."""
    found = (re.search(r"assertion failed: \[([^\]]*)\]", error.message)
             or re.search(r"(could not correctly convert string: \S+)", error.message))
    return found.group(1) if found else error.message.splitlines()[0]


def from_stream(data: MovieLens, holdout: str, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER) -> FitData:
    """The fit rows of `data`'s ratings file, streamed; the split is `split_row_numbers`, as in memory.

    One pass reads who rated what; every epoch streams the file again through a shuffle buffer of
    `shuffle_buffer` rows (MovieLens files are sorted by user, so the buffer should span many users).
    """
    path = data.source / data.spec.ratings_file
    row_count = count_rows(path, data.spec.header is not None)
    in_fit = np.zeros(row_count, dtype=bool)
    in_fit[split_row_numbers(row_count, holdout)[0]] = True
    blocks = stream_blocks(data, in_fit)
    user_parts, item_parts, star_parts = [], [], []
    try:
        for block in blocks.prefetch(2).as_numpy_iterator():
            if len(block) and block[:, :2].max() >= 2**31:
                raise DataFormatError(f"{path}: an id does not fit in 31 bits")
            # int32 halves the one O(rows) structure kept in memory.
            user_parts.append(block[:, 0].astype(np.int32))
            item_parts.append(block[:, 1].astype(np.int32))
            star_parts.append((block[:, 2] * data.rating_scale).astype(np.float32))
    except tf.errors.InvalidArgumentError as error:
        raise DataFormatError(f"{path}: {row_error(error)}") from None
    users, items, stars = np.concatenate(user_parts), np.concatenate(item_parts), np.concatenate(star_parts)
    check_rated_movies_known(data.source, np.unique(items), data.items)

    def batches(batch_size: int, seed: int) -> tf.data.Dataset:
        return (blocks.unbatch()
                .shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
                .batch(batch_size)
                .map(lambda rows: {"user_id": tf.strings.as_string(rows[:, 0]),
                                   "item_id": tf.strings.as_string(rows[:, 1]),
                                   "rating": tf.cast(rows[:, 2], tf.float32) * data.rating_scale})
                .prefetch(tf.data.AUTOTUNE))

    return FitData(*_summarise(users, items, stars), row_count=len(users), batches=batches)
