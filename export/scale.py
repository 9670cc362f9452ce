"""What training chooses by the size of the data, so that no flag beyond the data is needed.

A preset is tuned on MovieLens 100k (80,000 fit rows, 1,682 movies). On a larger catalog some of its
choices stop fitting, and `fit_to_data` replaces them, field by field:
- a softmax over every movie (`full_softmax`) costs movies x batch per step: above
  FULL_SOFTMAX_MAX_MOVIES movies both two-tower heads train on in-batch negatives with the logQ
  correction (`sampled`);
- the ranker's item-item part (EASE) keeps a dense movies x movies matrix: it is left out above
  EASE_MAX_MOVIES movies;
- epochs are counted in rows seen: a preset's epochs over its reference data set's rows are a budget
  of REFERENCE_ROWS x epochs examples, which a larger data set spends in fewer passes (at least
  one); past LARGE_DATA_ROWS fit rows, one tower pair per head instead of an ensemble;
- a history tower's step sums each batch user's whole history (and each batch movie's raters), so
  its cost per row grows with the histories' lengths, not with the rows: past LARGE_DATA_ROWS fit
  rows each step sums at most HISTORY_SAMPLE entries per history, an unbiased estimate of the sum.
Every choice is recorded, with its reason, in the export's metadata (`scale`). Fields set with
`--set` are never changed.
"""
from __future__ import annotations

import dataclasses
import math

from recsys.export.index import RECALL_K, IndexSpec
from recsys.export.item_item import EASE_MAX_MOVIES
from recsys.export.presets import Preset

FULL_SOFTMAX_MAX_MOVIES = 2_000
REFERENCE_ROWS = 80_000
LARGE_DATA_ROWS = 400_000
HISTORY_SAMPLE = 64


def _loss(movies: int) -> tuple[str, str]:
    if movies <= FULL_SOFTMAX_MAX_MOVIES:
        return "full_softmax", f"{movies:,} movies: a softmax over all of them (at most {FULL_SOFTMAX_MAX_MOVIES:,})"
    return "sampled", f"{movies:,} movies: in-batch negatives with the logQ correction (over {FULL_SOFTMAX_MAX_MOVIES:,})"


def _epochs(epochs: int, rows: int) -> int:
    return max(1, min(epochs, math.ceil(epochs * REFERENCE_ROWS / max(rows, 1))))


def fit_to_data(preset: Preset, users: int, movies: int, rows: int, fixed: frozenset[str] = frozenset()
                ) -> tuple[Preset, dict[str, dict]]:
    """`preset` with the choices that fit `users` x `movies` and `rows` fit rows, and what was chosen
    and why (field -> {"value", "reason"})."""
    choices: dict[str, dict] = {}

    def choose(field: str, value, reason: str, always: bool = False) -> None:
        if always or field not in fixed:
            choices[field] = {"value": value, "reason": reason}

    for field in ("retrieval_loss", "watch_loss"):
        if getattr(preset, field) == "auto":  # set or not, "auto" is a choice to make
            choose(field, *_loss(movies), always=True)
    if preset.uses_ease and movies > EASE_MAX_MOVIES:
        reason = f"{movies:,} movies: EASE's dense weights fit at most {EASE_MAX_MOVIES:,}"
        choose("ease_weight", 0.0, reason)
        choose("ease_weight_new_users", 0.0, reason)
    if preset.scale_to_data:
        for field in ("retrieval_epochs", "ranking_epochs"):
            epochs = _epochs(getattr(preset, field), rows)
            if epochs != getattr(preset, field):
                choose(field, epochs, f"{rows:,} fit rows: the preset's {getattr(preset, field)} epochs of "
                                      f"{REFERENCE_ROWS:,} rows, at least one pass")
        if rows > LARGE_DATA_ROWS and preset.ensemble_size > 1:
            choose("ensemble_size", 1, f"{rows:,} fit rows: one tower pair per head (over {LARGE_DATA_ROWS:,})")
        if rows > LARGE_DATA_ROWS and not preset.history_sample:
            choose("history_sample", HISTORY_SAMPLE, f"{rows:,} fit rows: each step sums at most {HISTORY_SAMPLE} "
                                                     f"entries of a history (over {LARGE_DATA_ROWS:,})")
    return dataclasses.replace(preset, **{field: choice["value"] for field, choice in choices.items()}), choices


# Below this many movies an index scores them all: brute force is then as fast as probing cells
# (docs/performance.md "Catalog scale" measures where the two cross).
PARTITIONED_MIN_MOVIES = 50_000
# A partitioned index has about CELLS_PER_ROOT x sqrt(movies) cells (a power of two): smaller cells
# reach the recall target with fewer movies probed, until scoring the centroids costs more than they
# save (docs/performance.md "Catalog scale" measures both). Its probes start from the fewest whose
# movies hold twice the k asked for (at least MIN_PROBES); export takes the fewest from there whose
# recall@100 on a sample of its queries (trained users; movies for SimilarItems) reaches
# RECALL_TARGET + TUNING_MARGIN (export/index.py IndexSpec.build): probes chosen on one sample
# recall less on other queries.
CELLS_PER_ROOT = 2
MIN_PROBES = 4
RECALL_TARGET = 0.95
TUNING_MARGIN = 0.01
# Chosen by size ("auto"), a partitioned index is then timed against brute force on the same queries
# (export/index.py IndexSpec.timed_k) and the faster is built: at 16 queries a call the partitioned
# index costs roughly ten times its probed share of brute force's time (docs/performance.md
# "Catalog scale"), so near PARTITIONED_MIN_MOVIES, or on embeddings with little structure, brute
# force can win.


def choose_index(preset: Preset, movies: int, k: int) -> IndexSpec:
    """How to index `movies` movies a query asks the best `k` of: the preset's `retrieval_index`,
    `index_cells` and `index_probes`, with "auto" and 0 decided by the catalog's size."""
    if preset.retrieval_index == "brute_force" or (preset.retrieval_index == "auto" and movies < PARTITIONED_MIN_MOVIES):
        reason = ("retrieval_index=brute_force" if preset.retrieval_index == "brute_force" else
                  f"{movies:,} movies: every one scored (below {PARTITIONED_MIN_MOVIES:,})")
        return IndexSpec("brute_force", reason=reason)
    cells = preset.index_cells or min(movies, 2 ** max(0, round(math.log2(CELLS_PER_ROOT * math.sqrt(movies)))))
    probes = preset.index_probes or min(cells, max(MIN_PROBES, math.ceil(2 * k * cells / movies)))
    reason = (f"{movies:,} movies: {cells} k-means cells, " + (f"{probes} probed" if preset.index_probes else
              f"the fewest probes from {probes} whose recall@{RECALL_K} on a sample of its queries reaches "
              f"{RECALL_TARGET + TUNING_MARGIN:.2f}"))
    tune_to = 0.0 if preset.index_probes else RECALL_TARGET + TUNING_MARGIN
    return IndexSpec("partitioned", cells, probes, reason, tune_to=tune_to,
                     timed_k=k if preset.retrieval_index == "auto" else 0)
