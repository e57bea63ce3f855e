"""A generic host over any fsspec filesystem: SFTP, WebDAV, GCS, Azure, memory...

Spec: ``fsspec:<URL of a directory>``, for example::

    fsspec:sftp://alice@backup.example.org/srv/pool
    fsspec:memory://pool
    fsspec:webdav://pool                 (with the option base_url="https://dav.example.org/dav")
    fsspec:webdav+https://dav.example.org/dav/pool

Objects are stored as ``ROOT/<sha256 hex>`` and recorded with the URL
``ROOT_URL/<sha256 hex>``, where ``ROOT_URL`` is the spec's URL without any
password and without a trailing slash (the user name is kept). The recorded
URL is an identifier that :meth:`FsspecHost.accepts` recognises, not a link
that works without this host's configuration: a ``webdav://pool`` path is
relative to the ``base_url`` option. The default host name is that root
URL too, so give a ``name`` to each of two hosts that share one (the same
``webdav://pool`` path on two servers).

``webdav+http://`` and ``webdav+https://`` are a shorthand for WebDAV: the
scheme and the server part become ``base_url`` (``http://host:port``), the
path becomes the directory, and ``user:password@`` becomes the ``auth``
option. Such a host records ``webdav://host:port/path/<hash>`` URLs.

Keyword options: ``name``, ``timeout``, ``max_connections``, ``weight`` and
``storage_options`` (a dict passed to the fsspec filesystem). Every other
keyword goes into the storage options too, which keeps configuration files
flat. In a ``cloudmanager.toml`` a host's ``options`` become these keywords::

    [hosts.nextcloud]
    spec = "fsspec:webdav://pool"

    [hosts.nextcloud.options]
    base_url = "https://cloud.example.org/remote.php/dav/files/alice"
    auth = ["alice", "an app password"]      # a list becomes the (user, password) pair
    timeout = 120

    [hosts.backup]
    spec = "fsspec:sftp://alice@backup.example.org/srv/pool"
    options = { key_filename = "/home/alice/.ssh/id_ed25519" }

Secrets (passwords in the URL, and storage options such as ``password``,
``auth``, ``token`` or ``key``) are passed to fsspec only: they never appear
in a recorded URL, the host's name, its ``repr``, an error message or a log
line.

The filesystem is created on first use, so a server that is down when the
pool starts (SFTP connects as it is created) costs a failed transfer, not a
failed start. Uploads go to a temporary name in the root
(``.<hash>.<random>.tmp``) and are then renamed, so readers never see a
partial object where the filesystem's rename is atomic (local files, SFTP, a
WebDAV ``MOVE`` onto a new name on most servers). A temp file left by a crash
is never listed and may be deleted by hand.
"""

import errno
import hashlib
import logging
import os
import secrets
import socket
import stat
import sys
import threading
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple, Type
from urllib.parse import unquote, urlsplit

import fsspec  # the library: absolute imports never resolve to this module
from fsspec import callbacks as fsspec_callbacks

from .. import fsutil, meter
from ..errors import (
    HostError,
    HostNotFoundError,
    HostUnavailableError,
    InvalidInputError,
    MissingDependencyError,
    PermanentHostError,
    TransientHostError,
)
from ..validation import (
    SECRET_OPTION,
    check_host_name,
    check_url,
    is_hash,
    redact_url_passwords,
)
from .base import (
    Host, HostStream, ListedObject, Location, ObjectInfo, PathLike, Received, Staged, Stream,
    check_name_prefix, staging_name,
)

log = logging.getLogger(__name__)

#: Shorthand schemes for WebDAV → the scheme of the server's base URL.
_WEBDAV_SUGAR = {"webdav+http": "http", "webdav+https": "https"}
_WEBDAV_PROTOCOLS = ("webdav", "dav")
#: Protocol → the storage option that bounds one network operation.
_TIMEOUT_OPTION = {"webdav": "timeout", "dav": "timeout", "sftp": "timeout", "ssh": "timeout"}
#: Which extra of cloudmanager installs a protocol's client library.
_EXTRA = {"webdav": "webdav", "dav": "webdav", "sftp": "sftp", "ssh": "sftp"}


_NETWORK_ERRNOS = frozenset({
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT,
    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN,
    errno.ENETRESET, errno.EPIPE,
})
# Library exceptions recognised by class name, so that no client library has
# to be imported to classify its errors (httpx, paramiko, aiohttp, azure).
_UNAVAILABLE_NAMES = frozenset({
    "TimeoutException", "NetworkError", "ProxyError",      # httpx (webdav4)
    "NoValidConnectionsError",                             # paramiko (sftp)
    "ClientConnectionError", "ServerTimeoutError",         # aiohttp (http, gcs)
    "ServiceRequestError",                                 # azure
})
_PERMANENT_NAMES = frozenset({
    "ForbiddenOperation",                                  # webdav4: 403 on MOVE, MKCOL
    "AuthenticationException", "BadHostKeyException",      # paramiko
    "ClientAuthenticationError",                           # azure
})
_NOT_FOUND_NAMES = frozenset({"ResourceNotFound", "ResourceNotFoundError"})


class FsspecHost(Host):
    """Store copies in a directory of any fsspec filesystem.

    :param url: the fsspec URL of the directory, e.g. ``sftp://alice@host/srv/pool``
        (a password in it is used, never recorded)
    :param name: the host name recorded with uploads (default: the URL
        without its password)
    :param timeout: seconds one network operation may take; passed to the
        WebDAV and SFTP clients as their ``timeout`` option
    :param max_connections: how many transfers may run at once
    :param weight: preference among equally healthy hosts
    :param storage_options: options for the fsspec filesystem (``base_url``,
        ``auth``, ``password``, ``key_filename``, ``token``...)
    :param more_options: further storage options, merged into ``storage_options``
    :raises InvalidInputError: for a malformed URL, an unknown protocol, an
        option given twice, or a URL or name that could not be recorded
    :raises MissingDependencyError: if the protocol's client library is missing
    """

    can_delete = True
    can_check = True
    can_list = True
    can_stage = True
    can_stream = True
    url_prefix: str  # set by __init__: every fsspec host has one

    def __init__(self, url: str, name: Optional[str] = None, timeout: Optional[float] = None,
                 max_connections: Optional[int] = None, weight: Optional[float] = None,
                 storage_options: Optional[Dict[str, Any]] = None,
                 **more_options: Any) -> None:
        if not isinstance(url, str) or not url:
            raise InvalidInputError("an fsspec host needs a URL, not %r" % (type(url).__name__,))
        options = dict(storage_options or {})
        for key, value in more_options.items():
            if key in options:
                raise InvalidInputError("storage option %r given twice" % key)
            options[key] = value
        if isinstance(options.get("auth"), list):
            # TOML and JSON have no tuples; httpx wants (user, password)
            options["auth"] = tuple(options["auth"])
        if timeout is not None:
            self.timeout = float(timeout)
        if max_connections is not None:
            self.max_connections = int(max_connections)
        if weight is not None:
            self.weight = float(weight)

        self._url, self.root_url, protocol = self._parse(url, options)
        self._check_protocol(protocol)
        if timeout is not None and protocol in _TIMEOUT_OPTION:
            options.setdefault(_TIMEOUT_OPTION[protocol], self.timeout)
        # Each host gets its own filesystem object: fsspec would otherwise
        # share one between equal configurations, and close() would close it
        # under the other host's feet.
        options.setdefault("skip_instance_cache", True)
        self._options = options
        self._secrets = _secrets_of(url, options)

        self.url_prefix = self.root_url + "/"
        try:
            check_url(self.url_prefix + "0" * 64)
        except InvalidInputError as exc:
            raise InvalidInputError("fsspec host %s would record URLs that cannot be stored: %s"
                                    % (self.root_url, exc)) from None
        self.name = check_host_name(name) if name is not None else self._default_name(url)

        self._lock = threading.Lock()
        self._fs: Any = None
        self._root = ""  # set with _fs
        self._root_ready = False

    @classmethod
    def from_spec(cls, scheme: str, target: str, **options: Any) -> "FsspecHost":
        """Build from ``fsspec:<URL>``.

        :param scheme: ``"fsspec"``
        :param target: the fsspec URL of the directory
        :param options: keyword options of :class:`FsspecHost`
        :return: a new :class:`FsspecHost`
        """
        return cls(target, **options)

    # -- configuration -------------------------------------------------------

    @staticmethod
    def _parse(url: str, options: Dict[str, Any]) -> Tuple[str, str, str]:
        """Split a spec URL into (URL for fsspec, credential-free root URL, protocol)."""
        if "::" in url:
            raise InvalidInputError("chained fsspec URLs are not supported")
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise InvalidInputError("fsspec host URL does not parse: %s" % exc) from None
        scheme = parts.scheme.lower()
        if not scheme or "://" not in url:
            raise InvalidInputError("an fsspec host needs a URL with a scheme, like memory://pool")
        if parts.query or parts.fragment:
            raise InvalidInputError("an fsspec host URL takes no query or fragment")
        userinfo, _, hostport = parts.netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = ("%s@%s" % (user, hostport)) if userinfo else hostport
        path = parts.path.rstrip("/")
        if scheme in _WEBDAV_SUGAR:
            if "base_url" in options:
                raise InvalidInputError("a %s:// URL already names the server; drop base_url"
                                        % scheme)
            if not hostport:
                raise InvalidInputError("a %s:// URL needs a server" % scheme)
            options["base_url"] = "%s://%s" % (_WEBDAV_SUGAR[scheme], hostport)
            if userinfo and "auth" not in options:
                password = userinfo.split(":", 1)[1] if ":" in userinfo else ""
                options["auth"] = (unquote(user), unquote(password))
            # the root path is relative to base_url, which is the server itself
            fsspec_url = "webdav://" + (path.lstrip("/") or "/")
            return fsspec_url, "webdav://%s%s" % (netloc, path), "webdav"
        return url, "%s://%s%s" % (scheme, netloc, path), scheme

    @staticmethod
    def _check_protocol(protocol: str) -> None:
        """Fail now, not at the first transfer, on an unknown protocol or a missing library."""
        try:
            fsspec.get_filesystem_class(protocol)
        except ValueError:
            raise InvalidInputError("fsspec knows no protocol %r" % protocol) from None
        except ImportError as exc:
            if protocol in _EXTRA:
                hint = "pip install 'cloudmanager[%s]'" % _EXTRA[protocol]
            else:  # fsspec's own message names the package
                hint = "pip install %s" % (getattr(exc.__cause__, "name", None) or "it")
            raise MissingDependencyError("fsspec:%s hosts need another package (%s): %s"
                                         % (protocol, exc, hint)) from exc

    def _default_name(self, url: str) -> str:
        parts = urlsplit(url)
        name = self.root_url
        if parts.scheme.lower() in _WEBDAV_SUGAR:
            name = parts.scheme.lower() + self.root_url[len("webdav"):]
        try:
            return check_host_name(name)
        except InvalidInputError:
            raise InvalidInputError("%s is not usable as a host name; pass name=..."
                                    % self._redact(name)) from None

    def _filesystem(self) -> Tuple[Any, str]:
        """The fsspec filesystem and root path, created on first use."""
        with self._lock:
            if self._fs is None:
                fs, root = fsspec.core.url_to_fs(self._url, **self._options)
                self._fs, self._root = fs, root.rstrip("/")
            return self._fs, self._root

    def _ensure_root(self, fs: Any, root: str) -> None:
        # Once per host: a makedirs is several requests on WebDAV.
        if self._root_ready or root in ("", "/"):
            return
        fs.makedirs(root, exist_ok=True)
        self._root_ready = True

    # -- names and errors ----------------------------------------------------

    def _redact(self, text: str) -> str:
        text = redact_url_passwords(text)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _error(self, exc: BaseException, what: str, missing_is_not_found: bool = True
               ) -> HostError:
        """Translate any exception into a :class:`HostError` whose message holds no secret.

        :param exc: the exception raised by fsspec or its client library
        :param what: what was being done, e.g. ``"cannot read URL"``
        :param missing_is_not_found: whether "no such file" means the object
            is missing (False while storing: the object is not expected there)
        :return: the :class:`HostError` to raise
        """
        if isinstance(exc, HostError):
            return exc
        detail = self._redact("%s: %s" % (type(exc).__name__, exc) if str(exc)
                              else type(exc).__name__)
        message = "%s: %s" % (what, detail)
        names = {cls.__name__ for cls in type(exc).__mro__}
        status = _http_status(exc)
        kind: Type[HostError]
        if status is not None:
            if status in (404, 410):
                kind = HostNotFoundError if missing_is_not_found else TransientHostError
            elif status in (401, 403, 407):
                kind = PermanentHostError
            else:  # 5xx, 408, 429 and the unexpected: worth another try
                kind = TransientHostError
        elif isinstance(exc, FileNotFoundError) or names & _NOT_FOUND_NAMES:
            kind = HostNotFoundError if missing_is_not_found else TransientHostError
        elif isinstance(exc, PermissionError) or names & _PERMANENT_NAMES:
            kind = PermanentHostError
        elif (isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror, socket.herror))
              or (isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS)
              or names & _UNAVAILABLE_NAMES):
            kind = HostUnavailableError
        else:
            kind = TransientHostError
        return kind(self.name, message)

    def _unless_root_missing(self, error: HostError) -> HostError:
        """A not-found whose pool directory is missing too is an outage, not a
        lost copy: a wrong base_url or an unmounted share must not get every
        copy marked bad."""
        if not isinstance(error, HostNotFoundError):
            return error
        try:
            fs, root = self._filesystem()
            fs.invalidate_cache(root)
            root_there = root in ("", "/") or fs.isdir(root)
        except Exception:  # cannot tell: the object's absence is all we know
            return error
        if root_there:
            return error
        return HostUnavailableError(self.name, "%s, and the pool directory is missing too "
                                               "(wrong base URL, or not mounted?)" % error.message)

    # -- operations ----------------------------------------------------------

    def _remote_size(self, fs: Any, path: str) -> Optional[int]:
        """Size of the file at ``path``, or None if there is none."""
        fs.invalidate_cache(path)  # object stores cache listings; we want the truth
        try:
            info = fs.info(path)
        except FileNotFoundError:
            return None
        if info.get("type", "file") != "file" or info.get("size") is None:
            return None
        return int(info["size"])

    def _put(self, fs: Any, local_path: PathLike, path: str) -> None:
        # The library reads the file itself: the meter of this call (progress,
        # bandwidth limit) goes with it as its callback.
        metered = meter.current()
        if _is_webdav(fs):
            # webdav4's put_file re-creates the parent directory first: three
            # requests per upload that _ensure_root made useless.
            fs.client.upload_file(local_path, path, overwrite=True, callback=metered)
        elif metered is not None:
            fs.put_file(local_path, path, callback=_MeterCallback(metered))
        else:
            fs.put_file(local_path, path)

    def _rename(self, fs: Any, src: str, dst: str) -> None:
        if _is_webdav(fs):
            # fsspec's generic mv is COPY then DELETE for webdav4, which
            # writes the destination in place; MOVE is one rename on the server.
            fs.client.move(src, dst, overwrite=True)
        else:
            fs.mv(src, dst)

    def _remove_quietly(self, fs: Any, path: str) -> None:
        try:
            fs.rm_file(path)
        except Exception as exc:  # best effort: a stray temp file is harmless
            log.debug("%s: could not remove %s: %s", self.name, path,
                      self._redact(str(exc)))

    def _holds(self, fs: Any, path: str, name: str) -> bool:
        """Whether the file at ``path`` exists and its bytes hash to ``name``.

        Reads the whole object: only for the rare case of a rename that
        failed, never for every upload.
        """
        fs.invalidate_cache(path)
        digest = hashlib.sha256()
        try:
            with fs.open(path, "rb") as remote:
                for chunk in iter(lambda: remote.read(fsutil.CHUNK), b""):
                    digest.update(chunk)
        except Exception:  # unreadable is no proof: the rename's own error is raised
            return False
        return digest.hexdigest() == name

    def upload(self, local_path: PathLike, name: str) -> Location:
        """Store ``local_path`` as ``ROOT/name``: a temp name in the root, then a rename.

        The file is always sent, even over an object already there: a
        filesystem gives its size at most, and the same size is no proof
        that the bytes are right (a damaged copy would stay and be recorded
        as good).

        :param local_path: a readable local file
        :param name: the object's name, a SHA-256 hex digest
        :return: the :class:`~cloudmanager.hosts.base.Location` of the copy
        :raises InvalidInputError: if ``name`` is not a SHA-256 hex digest
        :raises HostError: on failure (never a raw library exception)
        """
        if not is_hash(name):
            raise InvalidInputError("objects are named by SHA-256, not %r" % (name,))
        # A missing source fails here, before any request to the server.
        try:
            if not stat.S_ISREG(os.stat(local_path).st_mode):
                raise IsADirectoryError(errno.EISDIR, "not a regular file")
        except OSError as exc:
            raise TransientHostError(self.name, "cannot read %s: %s"
                                     % (local_path, exc.strerror or exc)) from exc
        location = Location(self.name, self.url_prefix + name)
        try:
            fs, root = self._filesystem()
            final = root + "/" + name
            self._ensure_root(fs, root)
            # A random suffix: concurrent uploads of one object never share a temp.
            temp = "%s/.%s.%s.tmp" % (root, name, secrets.token_hex(6))
            renamed = False
            try:
                self._put(fs, local_path, temp)
                try:
                    self._rename(fs, temp, final)
                    renamed = True
                except Exception:
                    # A concurrent upload of the same object may have won;
                    # only its bytes, hashed, can tell (not its size).
                    if not self._holds(fs, final, name):
                        raise
                    log.debug("%s: a concurrent upload stored %s first", self.name, name)
            finally:
                if not renamed:
                    self._remove_quietly(fs, temp)
        except Exception as exc:
            raise self._error(exc, "cannot store %s" % name, missing_is_not_found=False) from exc
        log.debug("stored %s at %s", name, location.url)
        return location

    def stage(self, stream: Stream, size: int) -> Staged:
        """Write ``stream`` to ``ROOT/.cloudmanager-staging-<random>.tmp``.

        :meth:`Staged.publish` renames it to its object name, as
        :meth:`upload` renames its temp file (a WebDAV ``MOVE``). The staging
        file is never listed (its name is not a SHA-256).

        :param stream: the bytes, read once to their end
        :param size: the bytes expected (WebDAV sends it as the Content-Length)
        :return: the :class:`~cloudmanager.hosts.base.Staged` file
        :raises HostError: on failure (the staging file is removed, best
            effort); an exception of ``stream`` itself may come out as it is
        """
        try:
            fs, root = self._filesystem()
            self._ensure_root(fs, root)
        except Exception as exc:
            raise self._error(exc, "cannot stage a file", missing_is_not_found=False) from exc
        temp = root + "/" + staging_name()
        try:
            if _is_webdav(fs):
                # One PUT streaming the bytes, without re-creating the root.
                fs.client.upload_fileobj(stream, temp, overwrite=True, size=size)
            else:
                with fs.open(temp, "wb") as remote:
                    for chunk in iter(lambda: stream.read(fsutil.CHUNK), b""):
                        remote.write(chunk)
        except Exception as exc:
            self._remove_quietly(fs, temp)
            raise self._error(exc, "cannot stage a file", missing_is_not_found=False) from exc
        except BaseException:
            self._remove_quietly(fs, temp)
            raise
        log.debug("%s: staged %s", self.name, temp)
        return _FsspecStaged(self, temp)

    def _publish_staged(self, temp: str, name: str) -> Location:
        """Rename the staged ``temp`` to ``name`` (see :class:`_FsspecStaged`)."""
        try:
            fs, root = self._filesystem()
            final = root + "/" + name
            try:
                self._rename(fs, temp, final)
            except Exception:
                # As in upload(): a concurrent upload of the object may have won.
                if not self._holds(fs, final, name):
                    raise
                self._remove_quietly(fs, temp)
        except Exception as exc:
            raise self._error(exc, "cannot publish %s" % name,
                              missing_is_not_found=False) from exc
        return Location(self.name, self.url_prefix + name)

    def download(self, url: str, dest_path: PathLike,
                 max_bytes: Optional[int] = None) -> Received:
        """Stream the object into ``dest_path`` atomically.

        :param url: a URL this host :meth:`accepts`
        :param dest_path: the local file to write; replaced atomically
        :param max_bytes: refuse (and stop writing) past this many bytes
        :return: the SHA-256 and size of the bytes written, hashed as they arrived
        :raises PermanentHostError: if ``url`` is not an object of this host
        :raises HostNotFoundError: if the object is not there
        :raises TransientHostError: if it is larger than ``max_bytes``, or the
            copy failed
        :raises HostError: on any other failure
        """
        remote = self._open_remote(url, max_bytes)
        try:
            with remote:
                received = self.receive(remote, url, dest_path, max_bytes)
        except Exception as exc:
            # the object was there when opened: a failure now is the transfer's
            raise self._error(exc, "cannot read %s" % url, missing_is_not_found=False) from exc
        log.debug("fetched %s into %s", url, dest_path)
        return received

    def open_stream(self, url: str, max_bytes: Optional[int] = None) -> HostStream:
        """The object, open for reading on the filesystem; see :meth:`Host.open_stream`.

        :raises HostNotFoundError: if the object is not there
        :raises TransientHostError: if it is larger than ``max_bytes``
        :raises HostError: on any other failure
        """
        return HostStream(self._open_remote(url, max_bytes), self.name, url,
                          translate=lambda exc: self._error(exc, "cannot read %s" % url,
                                                            missing_is_not_found=False))

    def _open_remote(self, url: str, max_bytes: Optional[int]) -> Any:
        """The object's fsspec file, open for reading."""
        name = self.object_name(url)
        try:
            fs, root = self._filesystem()
            path = root + "/" + name
            if max_bytes is not None:
                # one cheap request saves sending a too-large object at all
                size = self._remote_size(fs, path)
                if size is None:
                    raise HostNotFoundError(self.name, "no object at %s" % url)
                if size > max_bytes:
                    raise TransientHostError(self.name, "%s is %d bytes, more than the %d expected"
                                             % (url, size, max_bytes))
            return fs.open(path, "rb")
        except Exception as exc:
            raise self._unless_root_missing(self._error(exc, "cannot open %s" % url)) from exc

    def stat(self, url: str) -> ObjectInfo:
        """Size of the object, from the filesystem's metadata.

        :param url: a URL this host :meth:`accepts`
        :return: an :class:`~cloudmanager.hosts.base.ObjectInfo`; its sha256
            is set only when the filesystem reports a real SHA-256
        :raises HostNotFoundError: if the object is not there
        :raises HostError: on any other failure
        """
        name = self.object_name(url)
        try:
            fs, root = self._filesystem()
            path = root + "/" + name
            fs.invalidate_cache(path)
            info = fs.info(path)
        except Exception as exc:
            raise self._unless_root_missing(self._error(exc, "cannot stat %s" % url)) from exc
        if info.get("type", "file") != "file" or info.get("size") is None:
            raise HostNotFoundError(self.name, "no object at %s" % url)
        digest = info.get("sha256")
        return ObjectInfo(int(info["size"]), digest if is_hash(digest) else None)

    def delete(self, url: str) -> None:
        """Delete the object; a missing one is not an error.

        :param url: a URL this host :meth:`accepts`
        :raises HostError: on failure
        """
        name = self.object_name(url)
        try:
            fs, root = self._filesystem()
            fs.rm_file(root + "/" + name)
        except Exception as exc:
            error = self._error(exc, "cannot delete %s" % url)
            if not isinstance(error, HostNotFoundError):
                raise error from exc
        log.debug("deleted %s", url)

    def _ls_root(self, missing_is_empty: bool) -> List[Dict[str, Any]]:
        """The root's entries, fresh (``ls(detail=True)``, its cache dropped).

        :param missing_is_empty: what a root that is not there means: no
            entries (nothing stored yet), or an outage (the objects a caller
            asks about were stored in it)
        :raises HostUnavailableError: if the root is missing and that is an outage
        :raises HostError: if the root cannot be listed
        """
        try:
            fs, root = self._filesystem()
            fs.invalidate_cache(root)
            return list(fs.ls(root or "/", detail=True))
        except Exception as exc:
            error = self._error(exc, "cannot list %s" % self.root_url)
            if isinstance(error, HostNotFoundError):
                if missing_is_empty:
                    return []
                error = HostUnavailableError(self.name, "%s: the pool directory is missing "
                                                        "(wrong base URL, or not mounted?)"
                                             % error.message)
            raise error from exc

    def list(self) -> Iterator[Tuple[str, int]]:
        """Yield ``(hash, size)`` for each object file in the root.

        Temp files of unfinished uploads and other names are skipped.

        :raises HostError: if the root cannot be listed
        """
        for entry in self._ls_root(missing_is_empty=True):
            base = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if is_hash(base) and entry.get("type", "file") == "file":
                yield base, int(entry.get("size") or 0)

    def list_objects(self, prefix: str = "") -> Iterator[ListedObject]:
        """Yield each object file of the root whose name starts with
        ``prefix``: its size, and its SHA-256 when the filesystem's listing
        reports a real one (``ls(detail=True)``; WebDAV reports none).

        One listing of the root whatever the prefix (:attr:`list_narrows`
        is False). Unlike :meth:`list`, a root that is not there is an
        outage: the objects a caller asks about were stored in it.

        :param prefix: lowercase hex digits
        :raises InvalidInputError: if ``prefix`` is not lowercase hex
        :raises HostUnavailableError: if the pool directory is missing
        :raises HostError: if the root cannot be listed
        """
        check_name_prefix(prefix)
        for entry in self._ls_root(missing_is_empty=False):
            base = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if base.startswith(prefix) and is_hash(base) \
                    and entry.get("type", "file") == "file" and entry.get("size") is not None:
                digest = entry.get("sha256")
                yield ListedObject(base, int(entry["size"]), digest if is_hash(digest) else None)

    def close(self) -> None:
        """Close the filesystem's connections; the next call opens new ones.

        Calling it twice is harmless.
        """
        with self._lock:
            fs, self._fs, self._root_ready = self._fs, None, False
        if fs is None:
            return
        try:
            if _is_webdav(fs):
                fs.client.http.close()
            elif hasattr(fs, "client") and hasattr(fs, "ftp"):  # fsspec's sftp
                fs.ftp.close()
                fs.client.close()
        except Exception as exc:  # closing must not fail the caller
            log.debug("closing %s: %s", self.name, self._redact(str(exc)))


class _FsspecStaged(Staged):
    """A staging file in an fsspec host's root."""

    host: FsspecHost

    def _publish(self, name: str) -> Location:
        return self.host._publish_staged(self.temp, name)

    def _discard(self) -> None:
        fs, _ = self.host._filesystem()
        self.host._remove_quietly(fs, self.temp)


class _MeterCallback(fsspec_callbacks.Callback):
    """An fsspec progress callback that hands each step to a :class:`~cloudmanager.meter.Meter`."""

    def __init__(self, metered: meter.Meter) -> None:
        super().__init__()
        self.metered = metered

    def relative_update(self, inc: int = 1) -> None:
        """``inc`` more bytes moved."""
        self.metered(inc)
        super().relative_update(inc)

    def absolute_update(self, value: int) -> None:
        """``value`` bytes moved so far."""
        self.metered(value - (self.value or 0))
        super().absolute_update(value)


def _is_webdav(fs: Any) -> bool:
    """Whether ``fs`` is webdav4's filesystem (checked without importing webdav4)."""
    module = sys.modules.get("webdav4.fsspec")
    return module is not None and isinstance(fs, module.WebdavFileSystem)


def _http_status(exc: BaseException) -> Optional[int]:
    """The HTTP status an exception carries (httpx, webdav4, aiohttp, gcsfs...), or None."""
    for holder in (exc, _attribute(exc, "response")):
        for attr in ("status_code", "status", "code"):
            value = _attribute(holder, attr)
            if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
                return value
    return None


def _attribute(obj: Any, attr: str) -> Any:
    # some libraries' exception properties raise when unset (httpx's .request)
    try:
        return getattr(obj, attr, None)
    except Exception:
        return None


def _secrets_of(url: str, options: Dict[str, Any]) -> List[str]:
    """Every secret string of a URL and storage options, longest first."""
    found: Set[str] = set()
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        found.update({password, unquote(password)})

    def collect(value: Any, secret: bool) -> None:
        if isinstance(value, str):
            if secret and value:
                found.add(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                collect(item, secret or bool(SECRET_OPTION.search(str(key))))
        elif isinstance(value, (list, tuple)):
            for item in value:
                collect(item, secret)

    for key, value in options.items():
        if key == "auth" and isinstance(value, tuple) and len(value) == 2:
            collect(value[1], True)  # (user, password): the user name is no secret
        else:
            collect(value, bool(SECRET_OPTION.search(key)))
    return sorted(found, key=len, reverse=True)
