"""Typed exceptions of cloudmanager.

The :class:`~cloudmanager.CloudManager` facade keeps the seed's return values
(``hash | False``, ``path | None | False``) and logs every failure. The layers
below it raise these exceptions instead, for callers who want them. They form
one shallow tree, so ``except CloudManagerError`` catches them all::

    CloudManagerError
    ├── DatabaseError
    ├── CacheError
    │   └── CacheFullError
    ├── HostError                      (.host: the host's name)
    │   ├── HostUnavailableError       down, timed out, refused: try again later
    │   ├── HostNotFoundError          the host does not hold that object
    │   ├── TransientHostError         anything else worth retrying
    │   └── PermanentHostError         retrying will not help
    │       └── CorruptCopyError       the host sent bytes that do not match
    ├── IntegrityError                 bytes did not match their SHA-256
    ├── UploadError                    (.failures: per-host errors)
    ├── DownloadError                  (.failures: per-host errors)
    ├── NotInPoolError                 the pool has no record of that hash
    ├── DestinationError               a download's destination cannot be written
    │   └── DestinationExistsError     ...without replacing other bytes
    ├── InvalidInputError              a hash, URL, spec or path was refused
    ├── ConfigError                    a cloudmanager.toml could not be used
    ├── LegacyPoolError                an original cloud-manager pool to import is
    │                                  missing, or is not one
    ├── MissingDependencyError         an optional backend is not installed
    ├── SerializationError             a JSON document could not be read
    ├── TreeError                      a tree manifest was refused, or a tree not made
    └── NotStartedError                an item of a batch the caller stopped
        └── UnsafePathError            (.path) a path would leave its destination
"""


class CloudManagerError(Exception):
    """Root of every exception raised by cloudmanager."""


class DatabaseError(CloudManagerError):
    """The SQLite database could not be opened, migrated or written."""


class CacheError(CloudManagerError):
    """The storage directory could not be used."""


class CacheFullError(CacheError):
    """There is no room in the cache, even after evicting every unpinned file."""


class HostError(CloudManagerError):
    """A host failed. ``host`` names it.

    :param host: the host's name
    :param message: what went wrong
    """

    #: Whether trying again later may succeed.
    transient = True

    def __init__(self, host, message):
        super().__init__("%s: %s" % (host, message))
        self.host = host
        self.message = message


class HostUnavailableError(HostError):
    """The host could not be reached, or did not answer in time."""


class HostNotFoundError(HostError):
    """The host does not hold the requested object (the link is dead)."""

    transient = False


class TransientHostError(HostError):
    """A failure that may go away if the operation is retried."""


class PermanentHostError(HostError):
    """A failure that retrying will not cure (bad request, refused file)."""

    transient = False


class CorruptCopyError(PermanentHostError):
    """The host returned bytes whose SHA-256 does not match: its copy is bad."""


class IntegrityError(CloudManagerError):
    """Downloaded or cached bytes did not match the expected SHA-256."""


class UnconfirmedIntegrityError(IntegrityError):
    """An external tool (the ``age`` command) refused the bytes. Its word
    alone condemns no copy, since the tool itself may be broken: the caller
    checks the bytes again another way."""


class _FailuresError(CloudManagerError):
    def __init__(self, message, failures=(), facts=(), verdicts=()):
        super().__init__(message)
        #: list of :class:`HostError`, one per host that failed
        self.failures = list(failures)
        #: what each host call did (:class:`cloudmanager.health.Fact`), for health
        self.facts = list(facts)
        #: what the attempts proved about copies (:class:`cloudmanager.engine.Verdict`)
        self.verdicts = list(verdicts)


class UploadError(_FailuresError):
    """No host accepted the file. ``failures`` lists each host's error."""


class DownloadError(_FailuresError):
    """No host delivered a good copy. ``failures`` lists each host's error."""


class NotInPoolError(CloudManagerError, KeyError):
    """The pool has no record of the hash asked for."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DestinationError(CloudManagerError):
    """A download's destination cannot be written (its directory is
    missing, say); the message names it as the caller gave it."""


class DestinationExistsError(DestinationError):
    """A download's destination holds other bytes (and replacing was not
    asked for), or is not a regular file: it is left as it is."""


class InvalidInputError(CloudManagerError, ValueError):
    """An argument was refused: a malformed hash, URL, host spec or path."""


class ConfigError(CloudManagerError, ValueError):
    """A configuration file could not be read, or holds an invalid setting."""


class LegacyPoolError(CloudManagerError, ValueError):
    """What was given as an original cloud-manager pool (``cm import-legacy``)
    cannot be one: no such database file, a database without the original's
    ``files`` table, or a storage folder that is not a directory."""


class MissingDependencyError(CloudManagerError, ImportError):
    """A host kind needs an optional dependency that is not installed.

    The message names the extra that installs it, e.g.
    ``pip install 'cloudmanager[s3]'``.
    """


class SerializationError(CloudManagerError, ValueError):
    """A JSON document could not be read as cloudmanager records."""


class TreeError(CloudManagerError, ValueError):
    """A tree manifest was refused (malformed, not a manifest, a field out of
    range), or a directory could not be recorded as a tree."""


class UnsafePathError(TreeError):
    """A path of a tree manifest, or what it meets in the destination, would
    put a file outside the destination (``..``, an absolute path, a symbolic
    link, a device name...). ``path`` names it, as the manifest has it."""

    def __init__(self, path, reason):
        super().__init__("refusing path %r: %s" % (path, reason))
        #: The path refused, as the manifest gives it.
        self.path = path


class NotStartedError(CloudManagerError):
    """An item of a batch that was not started because the caller asked the
    batch to stop (``warm_up_many(..., stop=)``): nothing was tried."""
