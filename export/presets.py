"""Named hyperparameter sets. A preset is recorded in each export's metadata."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# tf.distribute strategies `python -m recsys.export train --strategy` can train with (export/train.py).
STRATEGIES = ("default", "mirrored", "multi-worker")

# Fields that take one of a fixed set of values (export/models.py implements each).
CHOICES = {
    "retrieval_loss": ("auto", "in_batch", "full_softmax", "sampled"),
    "watch_loss": ("auto", "full_softmax", "sampled"),
    "retrieval_optimizer": ("adagrad", "adam"),
    "ranking_optimizer": ("adagrad", "adam"),
    "similar_space": ("co_rating", "item_towers"),
    "retrieval_index": ("auto", "brute_force", "partitioned"),
}


@dataclass(frozen=True)
class Preset:
    name: str
    embedding_dim: int
    # Retrieval: "in_batch" is the tutorial's sampled softmax over the batch's
    # items; "full_softmax" scores every movie in the catalog for every example; "sampled" is
    # in-batch with the logQ correction (export/models.py SampledSoftmax); "auto" picks by the
    # catalog's size (export/scale.py).
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
    # Independently initialised tower pairs trained side by side for retrieval and for the
    # watch head. The ranker's score sums all of them (concatenated towers: one dot product);
    # the retrieval index serves the first retrieval pair alone, so its cost per movie stays
    # that of one embedding_dim.
    ensemble_size: int = 1
    # The ranker's learning rate decays to 0 along a cosine over its epochs (seed to seed,
    # the rating head's RMSE then varies far less).
    ranking_cosine_decay: bool = False
    # Candidates the retrieval SavedModel returns per user (fixed at export).
    candidate_count: int = 200
    # The rating head's user tower adds the user's rated movies (SVD++'s implicit feedback).
    rating_user_history: bool = False
    # ... and its movie tower adds the users who rated the movie.
    rating_item_history: bool = False
    # Those history sums also weigh a second embedding by the stars given (minus the mean):
    # what the user liked and who liked the movie, not only who rated what.
    rating_taste: bool = False
    # Share of training examples whose user towers see the out-of-vocabulary id row instead of
    # their own (export/models.py IdDropout): it learns the generic user that serves users known
    # only by the interactions sent with a request.
    id_dropout: float = 0.0
    # Those examples keep each movie of their history with this probability: a new user has sent
    # only some of what they rated.
    history_keep: float = 1.0
    # While training, each step sums at most this many entries of a history (a user's rated movies,
    # a movie's raters), drawn at random and scaled to an unbiased estimate of the whole sum; 0 sums
    # them all. A step's cost then stays bounded however long the histories grow.
    history_sample: int = 0
    # Training steps per epoch; 0 is a pass over the fit rows. A few steps at a catalog's full size
    # build an export whose tables are the full one's, shape for shape: its serving memory and
    # start-up can be measured before hours of training (docs/performance.md), its quality cannot.
    steps_per_epoch: int = 0
    # The watch head's user towers add the user's rated movies to the id (as retrieval's do),
    # so interactions sent with a request move the watch score too.
    watch_history: bool = False
    # The ranker's score also adds an item-item model, EASE (Steck 2019) fit in closed form to the
    # training histories: weight x (sum over the user's history of B[movie, candidate]); one weight
    # for users the models know, one for users known only by their interactions.
    ease_weight: float = 0.0
    ease_weight_new_users: float = 0.0
    ease_lambda: float = 300.0
    # SimilarItems' space: "co_rating", movies' co-rating factors of `similar_dim` dimensions
    # (export/item_item.py co_rating_factors: an exact SVD of the sparse training matrix where it
    # is small, a randomized one otherwise); "item_towers", the item towers' embeddings.
    similar_space: str = "co_rating"
    similar_dim: int = 64
    # The watch head's softmax, as retrieval_loss (without "in_batch").
    watch_loss: str = "auto"
    # The retrieval and SimilarItems indexes (export/index.py): "brute_force" scores every movie,
    # "partitioned" only the movies of the `index_probes` best of `index_cells` k-means cells;
    # "auto" picks by the index's size (export/scale.py choose_index). 0 cells or probes: by size too.
    retrieval_index: str = "auto"
    index_cells: int = 0
    index_probes: int = 0
    # Let export/scale.py fit epochs and ensemble size to the data's size (fields set with --set stay).
    scale_to_data: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.ensemble_size < 1 or self.candidate_count < 1 or self.embedding_dim < 1:
            raise ValueError("ensemble_size, candidate_count and embedding_dim must be at least 1")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"id_dropout must be in [0, 1); got {self.id_dropout}")
        if min(self.ease_weight, self.ease_weight_new_users) < 0 or self.ease_lambda <= 0:
            raise ValueError("ease_weight and ease_weight_new_users must be 0 or more, ease_lambda above 0")
        if self.index_cells < 0 or self.index_probes < 0:
            raise ValueError("index_cells and index_probes must be 0 (chosen by the catalog's size) or more")
        if self.steps_per_epoch < 0:
            raise ValueError(f"steps_per_epoch must be 0 (a pass over the fit rows) or more; got {self.steps_per_epoch}")
        if self.history_sample < 0:
            raise ValueError(f"history_sample must be 0 (whole histories) or more; got {self.history_sample}")
        if not 0.0 < self.history_keep <= 1.0:
            raise ValueError(f"history_keep must be in (0, 1]; got {self.history_keep}")

    @property
    def uses_ease(self) -> bool:
        return bool(self.ease_weight or self.ease_weight_new_users)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_overrides(self, assignments: list[str]) -> "Preset":
        """This preset with `FIELD=VALUE` assignments applied (for tuning on the validation split);
        the export's metadata records every field as trained."""
        names = {field.name for field in dataclasses.fields(self)} - {"name"}
        changes = {}
        for assignment in assignments:
            key, separator, text = assignment.partition("=")
            if not separator or key not in names:
                raise ValueError(f"--set expects FIELD=VALUE with FIELD one of {', '.join(sorted(names))}; "
                                 f"got {assignment!r}")
            current = getattr(self, key)
            try:
                if isinstance(current, bool):
                    if text.lower() not in ("true", "false", "1", "0"):
                        raise ValueError("expected true or false")
                    changes[key] = text.lower() in ("true", "1")
                elif isinstance(current, tuple):
                    changes[key] = tuple(int(part) for part in text.split(",") if part)
                else:
                    changes[key] = type(current)(text)
            except ValueError as error:
                raise ValueError(f"--set {assignment}: {error}") from None
        try:
            return dataclasses.replace(self, **changes)
        except ValueError as error:
            raise ValueError(f"--set: {error}") from None


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
        retrieval_loss="auto",
        retrieval_optimizer="adam",
        retrieval_learning_rate=0.003,
        retrieval_batch_size=1024,
        retrieval_epochs=9,
        retrieval_l2=0.0,
        user_history=True,
        ranking_optimizer="adam",
        ranking_learning_rate=0.002,
        ranking_batch_size=1024,
        ranking_epochs=16,
        ranking_layers=(256, 64),
        rating_l2=2e-3,
        watch_weight=1.0,
        ranking_cosine_decay=True,
        ensemble_size=3,
        rating_user_history=True,
        rating_item_history=True,
        rating_taste=True,
        id_dropout=0.1,
        history_keep=0.5,
        watch_history=True,
        ease_weight=15.0,
        ease_weight_new_users=200.0,
    ),
    # Trains in seconds on a small catalog: for smoke tests of the whole system, never for serving.
    "tiny": Preset(
        name="tiny",
        embedding_dim=8,
        retrieval_loss="full_softmax",
        retrieval_optimizer="adam",
        retrieval_learning_rate=0.01,
        retrieval_batch_size=256,
        retrieval_epochs=2,
        retrieval_l2=0.0,
        user_history=True,
        ranking_optimizer="adam",
        ranking_learning_rate=0.01,
        ranking_batch_size=256,
        ranking_epochs=2,
        ranking_layers=(16,),
        rating_l2=1e-3,
        watch_weight=1.0,
        ensemble_size=2,
        candidate_count=40,
        rating_user_history=True,
        rating_item_history=True,
        rating_taste=True,
        id_dropout=0.2,
        history_keep=0.5,
        watch_history=True,
        ease_weight=10.0,
        ease_weight_new_users=100.0,
    ),
}
