"""Online half: load exported models (in-process or via TF Serving), run the pipeline, serve gRPC.

TFRS needs Keras 2, and TensorFlow picks its Keras when first imported: this is the one place
the switch is set, before any module of `server` or `export` (which imports `server`) loads it.
"""
import os
import re
import sys
import tempfile

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TensorFlow's C++ log at warnings, unless the user set the level (0 or 1 shows its info lines).
TENSORFLOW_LOG_LEVEL_SET = "TF_CPP_MIN_LOG_LEVEL" in os.environ
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Start-up lines TensorFlow's C++ writes to stderr before its logging is set up, whatever
# TF_CPP_MIN_LOG_LEVEL says: absl's info lines, the notice about them, and the "errors" of a
# machine without a GPU (there is nothing wrong with that here).
_START_UP_NOISE = re.compile(r"^(I\d{4} |WARNING: All log messages before absl::InitializeLog\(\)"
                             r"|E\d{4} .*(failed call to cuInit|Unable to register cu\w+ factory))")


def start_tensorflow():
    """Import TensorFlow and find its devices with the start-up noise filtered out of stderr; returns
    the module. Call it before anything else imports TensorFlow (CLI entry points do)."""
    if TENSORFLOW_LOG_LEVEL_SET and os.environ["TF_CPP_MIN_LOG_LEVEL"] in ("0", "1"):
        import tensorflow as tf
        tf.config.list_physical_devices()
        return tf
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)  # the C++ side writes to the file descriptor, not to sys.stderr
        try:
            import tensorflow as tf
            tf.config.list_physical_devices()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        lines = captured.read().decode("utf-8", "replace").splitlines()
    for line in lines:
        if not _START_UP_NOISE.match(line):
            print(line, file=sys.stderr)
    return tf
