"""Online half: load exported models (in-process or via TF Serving), run the pipeline, serve gRPC."""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
