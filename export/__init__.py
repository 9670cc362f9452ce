"""Offline half: load MovieLens, train both stages, evaluate, write TF Serving SavedModels."""
import recsys.server  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
