"""What one request may ask for: the limits the proto documents, in one place."""
DEFAULT_K = 10
MAX_K = 100
MAX_EXCLUDED_ITEMS = 10_000
MAX_USER_ID_LENGTH = 128
MAX_BATCH_USERS = 100
