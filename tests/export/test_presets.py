"""Preset overrides: the one way tuning runs change a hyperparameter."""
import dataclasses

import numpy as np
import pytest

from recsys.export.examples import from_rows
from recsys.export.presets import PRESETS


def test_overrides_convert_to_each_fields_type():
    preset = PRESETS["default"].with_overrides(
        ["ensemble_size=1", "rating_taste=false", "rating_l2=0.003", "ranking_layers=128,32", "retrieval_loss=in_batch"])
    assert (preset.ensemble_size, preset.rating_taste, preset.rating_l2) == (1, False, 0.003)
    assert preset.ranking_layers == (128, 32) and preset.retrieval_loss == "in_batch"
    assert preset.name == "default" and preset.to_dict()["ensemble_size"] == 1
    assert PRESETS["default"].with_overrides([]) == PRESETS["default"]


@pytest.mark.parametrize("assignment, message", [
    ("no_such_field=1", "FIELD one of"), ("ensemble_size", "FIELD=VALUE"), ("name=x", "FIELD one of"),
    ("ensemble_size=two", "ensemble_size=two"), ("rating_taste=maybe", "true or false"),
    ("retrieval_loss=full-softmax", "retrieval_loss must be one of auto, in_batch, full_softmax, sampled"),
    ("ranking_optimizer=sgd", "ranking_optimizer must be one of adagrad, adam"), ("ensemble_size=0", "at least 1"),
    ("steps_per_epoch=-1", "steps_per_epoch must be 0"),
])
def test_bad_overrides_are_refused(assignment, message):
    with pytest.raises(ValueError, match=message):
        PRESETS["default"].with_overrides([assignment])


def test_a_preset_with_an_unknown_choice_cannot_be_built():
    """Not a silent fallback: an unknown loss would otherwise train the full softmax."""
    with pytest.raises(ValueError, match="retrieval_loss"):
        dataclasses.replace(PRESETS["seed"], retrieval_loss="sampled_softmax")


def test_steps_per_epoch_caps_what_each_epoch_trains():
    """A short run at full size (for sizing an export): each stage trains that many steps an epoch,
    and 0 is a whole pass over the fit rows."""
    from recsys.export.train import train_ranking, train_retrieval

    rows = np.array([[user % 20 + 1, (user * 7) % 30 + 1, user % 5 + 1, user] for user in range(400)], np.int64)
    fit, item_ids = from_rows(rows), [str(item) for item in range(1, 31)]
    short = dataclasses.replace(PRESETS["tiny"], retrieval_batch_size=32, ranking_batch_size=32, steps_per_epoch=3)
    assert train_retrieval(fit, item_ids, short).optimizer.iterations.numpy() == 2 * 3
    assert train_ranking(fit, item_ids, short).optimizer.iterations.numpy() == 2 * 3
    whole = dataclasses.replace(short, steps_per_epoch=0)
    assert train_retrieval(fit, item_ids, whole).optimizer.iterations.numpy() == 2 * 13  # 400 rows / 32
