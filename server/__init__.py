"""Online half: load exported models (in-process or via TF Serving), run the pipeline, serve gRPC."""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Threads in each of TensorFlow's two pools unless the server is told otherwise
# (backend.set_tensorflow_threads says why one); here so the CLI can show it without TensorFlow.
TENSORFLOW_THREADS = 1
