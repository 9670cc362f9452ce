"""What a valid request is: every limit the proto documents, checked once at the edge, and the
types a valid request becomes. A message names the field and the limit; nothing that passes here
can fail later for its shape (a store that cannot hold a NUL byte, a timestamp no later write can
ever replace).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

from recsys.server.errors import InvalidRequest
from recsys.server.limits import (
    DEFAULT_K,
    MAX_EXCLUDED_ITEMS,
    MAX_FUTURE_SECONDS,
    MAX_ITEM_ID_LENGTH,
    MAX_K,
    MAX_RATING,
    MAX_RECENT_INTERACTIONS,
    MAX_USER_ID_LENGTH,
    MIN_RATING,
)


@dataclass(frozen=True)
class Interaction:
    """Something a user did with a movie: stars (0 = no rating) at a time (0 = unknown)."""

    item_id: str
    rating: float = 0.0
    timestamp_seconds: int = 0


@dataclass(frozen=True)
class Query:
    user_id: str
    k: int = DEFAULT_K
    exclude_item_ids: frozenset[str] = frozenset()
    include_rated: bool = False
    # One (movie id, stars) per movie, already deduplicated (`make_query`).
    recent_interactions: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class SimilarQuery:
    item_id: str
    k: int = DEFAULT_K
    exclude_item_ids: frozenset[str] = frozenset()
    user_id: str = ""  # "": nobody in particular


def _check_text(text: str, name: str) -> None:
    if "\x00" in text:
        raise InvalidRequest(f"{name} contains a NUL character, which ids may not")


def _check_item_id(item_id: str, name: str) -> None:
    if not item_id:
        raise InvalidRequest(f"{name} must not be empty")
    if len(item_id) > MAX_ITEM_ID_LENGTH:
        raise InvalidRequest(f"{name} is {len(item_id)} characters; the maximum is {MAX_ITEM_ID_LENGTH}")
    _check_text(item_id, name)


def validate_interactions(interactions: Sequence[Interaction], field_name: str = "recent_interactions") -> None:
    """Every limit the proto documents for a list of interactions; the message names the field.
    A timestamp may be at most MAX_FUTURE_SECONDS ahead of this server's clock: a row stamped in the
    far future would be a user's "newest" for ever."""
    if len(interactions) > MAX_RECENT_INTERACTIONS:
        raise InvalidRequest(f"{field_name} has {len(interactions)} entries; the maximum is {MAX_RECENT_INTERACTIONS}")
    latest = int(time.time()) + MAX_FUTURE_SECONDS
    for position, interaction in enumerate(interactions):
        name = f"{field_name}[{position}]"
        _check_item_id(interaction.item_id, f"{name}.item_id")
        rating = interaction.rating
        if math.isnan(rating) or rating != 0 and not MIN_RATING <= rating <= MAX_RATING:
            raise InvalidRequest(f"{name}.rating is {rating}; it must be 0 (no rating) or {MIN_RATING} to {MAX_RATING}")
        if interaction.timestamp_seconds < 0:
            raise InvalidRequest(f"{name}.timestamp_seconds is {interaction.timestamp_seconds}; it must not be "
                                 "negative")
        if interaction.timestamp_seconds > latest:
            raise InvalidRequest(f"{name}.timestamp_seconds is {interaction.timestamp_seconds}, more than "
                                 f"{MAX_FUTURE_SECONDS} s ahead of the server's clock")


def check_interactions(interactions: Sequence[Interaction],
                       field_name: str = "recent_interactions") -> tuple[tuple[str, float], ...]:
    """Validate interactions and keep one per movie, with its latest rating (by timestamp, the later
    entry on a tie); rating-less entries (0 stars) rate nothing, so they replace no rating."""
    validate_interactions(interactions, field_name)
    movies: dict[str, None] = {}
    rated: dict[str, tuple[int, float]] = {}
    for interaction in interactions:
        movies.setdefault(interaction.item_id)
        if interaction.rating and interaction.timestamp_seconds >= rated.get(interaction.item_id, (-1, 0.0))[0]:
            rated[interaction.item_id] = (interaction.timestamp_seconds, interaction.rating)
    return tuple((item_id, rated.get(item_id, (0, 0.0))[1]) for item_id in movies)


def check_user_id(user_id: str) -> str:
    if not user_id or not user_id.strip():
        raise InvalidRequest("user_id must not be empty")
    if len(user_id) > MAX_USER_ID_LENGTH:
        raise InvalidRequest(f"user_id is {len(user_id)} characters; the maximum is {MAX_USER_ID_LENGTH}")
    _check_text(user_id, "user_id")
    return user_id


def _check_k_and_exclusions(k: int, exclude_item_ids: Sequence[str]) -> None:
    if k > MAX_K:
        raise InvalidRequest(f"k={k} exceeds the maximum of {MAX_K}")
    if len(exclude_item_ids) > MAX_EXCLUDED_ITEMS:
        raise InvalidRequest(
            f"exclude_item_ids has {len(exclude_item_ids)} ids; the maximum is {MAX_EXCLUDED_ITEMS}")
    for position, item_id in enumerate(exclude_item_ids):
        if len(item_id) > MAX_ITEM_ID_LENGTH:
            raise InvalidRequest(f"exclude_item_ids[{position}] is {len(item_id)} characters; "
                                 f"the maximum is {MAX_ITEM_ID_LENGTH}")
        _check_text(item_id, f"exclude_item_ids[{position}]")


def make_similar_query(item_id: str, k: int, exclude_item_ids: Sequence[str], user_id: str) -> SimilarQuery:
    """Validate a SimilarItems request; the limits are the ones the proto documents."""
    _check_item_id(item_id, "item_id")
    _check_k_and_exclusions(k, exclude_item_ids)
    if user_id:
        check_user_id(user_id)
    return SimilarQuery(item_id, k or DEFAULT_K, frozenset(exclude_item_ids), user_id)


def make_query(user_id: str, k: int, exclude_item_ids: Sequence[str], include_rated: bool,
               recent_interactions: Sequence[Interaction] = ()) -> Query:
    """Validate one request's fields; the limits are the ones the proto documents."""
    check_user_id(user_id)
    _check_k_and_exclusions(k, exclude_item_ids)
    return Query(user_id=user_id, k=k or DEFAULT_K, exclude_item_ids=frozenset(exclude_item_ids),
                 include_rated=include_rated, recent_interactions=check_interactions(recent_interactions))
