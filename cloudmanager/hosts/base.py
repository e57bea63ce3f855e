"""The Host interface: one small contract every kind of host implements.

A host stores opaque objects and hands back a URL for each. It knows nothing
of the database or the cache. Each method translates the host's native
failures into :class:`~cloudmanager.errors.HostError` subclasses:
:class:`~cloudmanager.errors.HostUnavailableError` and
:class:`~cloudmanager.errors.TransientHostError` (worth retrying),
:class:`~cloudmanager.errors.HostNotFoundError` and
:class:`~cloudmanager.errors.PermanentHostError` (not).
"""

from typing import NamedTuple


class Location(NamedTuple):
    """Where one copy lives: what the pool records for it."""

    host_name: str
    url: str


class Host:
    """Base class of hosts. Subclasses set :attr:`name` and override the methods.

    Capabilities are declared as class attributes, never probed for.
    """

    #: The name recorded with each upload (``host_name`` in the JSON format).
    name = "host"
    #: Whether :meth:`delete` works.
    can_delete = False
    #: Whether :meth:`exists` works without downloading.
    can_check = False
    #: How many transfers may run against this host at once.
    max_connections = 4
    #: Seconds one transfer may take before it is abandoned.
    timeout = 600.0

    def upload(self, local_path, name):
        """Store the file at ``local_path`` under the object name ``name``.

        :param local_path: a readable local file; the host never modifies it
        :param name: the object's name, a SHA-256 hex digest
        :return: the :class:`Location` of the new copy
        :raises HostError: on failure
        """
        raise NotImplementedError

    def download(self, url, dest_path, max_bytes=None):
        """Fetch the object at ``url`` into ``dest_path``, atomically.

        On success ``dest_path`` holds the bytes the host returned (the caller
        verifies them). On failure nothing is left at ``dest_path``.

        :param max_bytes: the expected size; a host that can stop writing
            past it raises :class:`~cloudmanager.errors.TransientHostError`
            instead of filling the disk

        :raises HostNotFoundError: if the host does not hold the object
        :raises HostError: on any other failure
        """
        raise NotImplementedError

    def accepts(self, url):
        """Whether this host can download ``url`` (one recorded by any node)."""
        return False

    def exists(self, url):
        """Whether the object at ``url`` exists. Only when :attr:`can_check`."""
        raise NotImplementedError

    def delete(self, url):
        """Delete the object at ``url``. Only when :attr:`can_delete`."""
        raise NotImplementedError

    def close(self):
        """Release connections and other resources. The default does nothing."""

    def __repr__(self):
        return "<%s %s>" % (type(self).__name__, self.name)
