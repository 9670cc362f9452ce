"""Online half: load exported models (in-process or via TF Serving), run the pipeline, serve gRPC.

TFRS needs Keras 2, and TensorFlow picks its Keras when first imported: this is the one place
the switch is set, before any module of `server` or `export` (which imports `server`) loads it.
"""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
