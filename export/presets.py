"""Named hyperparameter sets. A preset is recorded in each export's metadata."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    embedding_dim: int
    # Retrieval: "in_batch" is the tutorial's sampled softmax over the batch's
    # items; "full_softmax" scores every movie in the catalog for every example.
    retrieval_loss: str
    retrieval_optimizer: str
    retrieval_learning_rate: float
    retrieval_batch_size: int
    retrieval_epochs: int
    retrieval_l2: float
    # Add the mean of the embeddings of the user's rated movies to the user tower.
    user_history: bool
    # Ranking: an MLP over its own user and movie embeddings, predicting stars.
    ranking_optimizer: str
    ranking_learning_rate: float
    ranking_batch_size: int
    ranking_epochs: int
    ranking_layers: tuple[int, ...]
    # L2 on the rating head's embeddings (the rating MLP overfits without it).
    rating_l2: float
    # Weight of the ranker's "will watch" softmax head; 0 = rating head only, and the
    # service orders by predicted rating (the tutorial's behaviour).
    watch_weight: float
    # Candidates the retrieval SavedModel returns per user (fixed at export).
    candidate_count: int = 200
    # The rating head's user tower adds the user's rated movies (SVD++'s implicit feedback).
    rating_user_history: bool = False
    # ... and its movie tower adds the users who rated the movie.
    rating_item_history: bool = False
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, Preset] = {
    "seed": Preset(
        name="seed",
        embedding_dim=32,
        retrieval_loss="in_batch",
        retrieval_optimizer="adagrad",
        retrieval_learning_rate=0.1,
        retrieval_batch_size=8192,
        retrieval_epochs=10,
        retrieval_l2=0.0,
        user_history=False,
        ranking_optimizer="adagrad",
        ranking_learning_rate=0.1,
        ranking_batch_size=8192,
        ranking_epochs=100,
        ranking_layers=(256, 64),
        rating_l2=0.0,
        watch_weight=0.0,
    ),
    "default": Preset(
        name="default",
        embedding_dim=64,
        retrieval_loss="full_softmax",
        retrieval_optimizer="adam",
        retrieval_learning_rate=0.003,
        retrieval_batch_size=1024,
        retrieval_epochs=9,
        retrieval_l2=0.0,
        user_history=True,
        ranking_optimizer="adam",
        ranking_learning_rate=0.002,
        ranking_batch_size=1024,
        ranking_epochs=13,
        ranking_layers=(256, 64),
        rating_l2=2e-3,
        watch_weight=1.0,
        rating_user_history=True,
        rating_item_history=True,
    ),
}
