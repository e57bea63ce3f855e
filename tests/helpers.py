"""Small helpers shared by the test modules."""

import hashlib


def sha(data):
    """The SHA-256 hex digest of ``data``."""
    return hashlib.sha256(data).hexdigest()
