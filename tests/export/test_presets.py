"""Preset overrides: the one way tuning runs change a hyperparameter."""
import pytest

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
])
def test_bad_overrides_are_refused(assignment, message):
    with pytest.raises(ValueError, match=message):
        PRESETS["default"].with_overrides([assignment])


def test_a_preset_with_an_unknown_choice_cannot_be_built():
    """Not a silent fallback: an unknown loss would otherwise train the full softmax."""
    import dataclasses

    with pytest.raises(ValueError, match="retrieval_loss"):
        dataclasses.replace(PRESETS["seed"], retrieval_loss="sampled_softmax")
