"""Offline half: load MovieLens, train both stages, evaluate, write TF Serving SavedModels.

TFRS needs Keras 2, so the legacy-Keras switch is set before TensorFlow is imported.
"""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
