"""cloudmanager: a pool of files kept on several hosts, with a local LRU cache.

Every file is addressed by its SHA-256 and recorded in a SQLite database with
the hosts and URLs that hold a copy. Start with :class:`CloudManager`::

    import cloudmanager
    help(cloudmanager.CloudManager)

Failures are logged on the ``cloudmanager`` logger; typed exceptions are in
:mod:`cloudmanager.errors`.
"""

from .errors import CloudManagerError
from .manager import CloudManager

__version__ = "0.3.0"
__all__ = ["CloudManager", "CloudManagerError", "__version__"]
