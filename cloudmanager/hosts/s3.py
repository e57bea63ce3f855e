"""S3 hosts: copies live as objects of an S3 or S3-compatible bucket.

Spec::

    s3://BUCKET[/PREFIX][?endpoint_url=URL&region=REGION&addressing_style=STYLE&profile=NAME]

Objects are stored under the key ``PREFIX/<sha256>`` (just ``<sha256>``
without a prefix) and recorded as ``s3://BUCKET/PREFIX/<sha256>``. The prefix
may be nested (``s3://my-bucket/pools/photos``); its segments may use letters,
digits and ``. _ ~ + = @ , -``.

Query parameters, all optional (each may instead be given as a keyword
option, e.g. from a configuration file, but not both ways):

- ``endpoint_url``: an S3-compatible service (MinIO, Backblaze B2, Ceph, ...);
- ``region``: the bucket's region;
- ``addressing_style``: ``path``, ``virtual`` or ``auto`` (the default);
- ``profile``: the AWS profile (of ``~/.aws/config``) to take settings and
  credentials from.

Further keyword options: ``name`` (default ``s3://BUCKET/PREFIX``),
``timeout`` (seconds), ``max_connections``, ``multipart_threshold`` and
``multipart_chunksize`` (bytes), ``max_attempts`` (requests per call,
retries included), ``weight``.

Credentials come only from the standard AWS chain: the
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` environment variables, a
profile, an instance role. A spec or an option that tries to carry one is
refused, so that secrets never end up in configuration files, records or
logs.

Example ``cloudmanager.toml`` table::

    [hosts.b2]
    spec = "s3://my-bucket/pool?addressing_style=path"

    [hosts.b2.options]
    endpoint_url = "https://s3.us-west-004.backblazeb2.com"
    region = "us-west-004"
    max_connections = 8
    timeout = 120

Uploads ask the server to check a SHA-256 of the bytes it receives. Files
above ``multipart_threshold`` go up in parts of ``multipart_chunksize``;
smaller ones in one conditional ``PutObject`` each (``If-None-Match: *``,
no ``HEAD`` first). Objects from ``multipart_threshold`` come down in byte
ranges on up to ``max_connections`` connections (4 at most).
"""

import base64
import binascii
import contextlib
import functools
import hashlib
import logging
import math
import os
import re
import threading
from typing import (Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Type,
                    Union)
from urllib.parse import unquote, urlsplit

import boto3
import botocore.exceptions as bexc
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import ProgressCallbackInvoker, TransferConfig, create_transfer_manager
from s3transfer.subscribers import BaseSubscriber
from s3transfer.utils import ReadFileChunk, signal_not_transferring, signal_transferring
from botocore.config import Config

from .. import fsutil, meter
from ..errors import (
    HostError,
    HostNotFoundError,
    HostUnavailableError,
    InvalidInputError,
    PermanentHostError,
    TransientHostError,
)
from ..validation import is_hash
from .base import (
    Host, HostStream, ListedObject, Location, ObjectInfo, PathLike, Received, Staged, Stream,
    check_name_prefix, staging_name,
)

log = logging.getLogger(__name__)

MiB = 1 << 20
#: S3 refuses parts below 5 MiB (except the last) and above 5 GiB.
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 << 30
#: Threads one managed transfer uses for the parts of a multipart upload.
TRANSFER_THREADS = 4
#: At most this many byte ranges of one large object at once: rclone's default
#: (``--multi-thread-streams 4``). More adds requests (a server may read the
#: whole object for each: moto does) without a faster disk behind them.
RANGED_STREAMS = 4

#: Keys that may come from the spec's query or from keyword options.
SPEC_KEYS = ("endpoint_url", "region", "addressing_style", "profile")
#: Keys that only come as keyword options.
OPTION_KEYS = ("name", "timeout", "max_connections", "multipart_threshold",
               "multipart_chunksize", "max_attempts", "weight")
ADDRESSING_STYLES = ("path", "virtual", "auto")

_CREDENTIAL_KEY = re.compile(r"pass|secret|token|key|auth|credential|cookie|session|signature",
                             re.IGNORECASE)
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]")
_PREFIX_SEGMENT = re.compile(r"[A-Za-z0-9._~+=@,-]+")
_CLIENT_ERROR_CODE = re.compile(r"An error occurred \(([A-Za-z0-9.]+)\)")
_CREDENTIALS_HINT = ("S3 credentials come only from the AWS credential chain: set the "
                     "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY environment variables, or "
                     "use profile=NAME with a profile of ~/.aws/config")

# S3 error codes by what retrying can do about them. Codes that are not
# listed fall back on the HTTP status (see _error_class).
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_PERMANENT_CODES = frozenset({
    "400", "403", "AccessDenied", "AllAccessDisabled", "AccountProblem",
    "AuthorizationHeaderMalformed", "ExpiredToken", "InvalidAccessKeyId", "InvalidArgument",
    "InvalidBucketName", "InvalidRequest", "InvalidToken", "MethodNotAllowed", "NoSuchBucket",
    "NotImplemented", "PermanentRedirect", "SignatureDoesNotMatch",
})
_TRANSIENT_CODES = frozenset({
    # BadDigest and its kin: the bytes were damaged on the way; a new try
    # sends them again.
    "BadDigest", "IncompleteBody", "InternalError", "NoSuchUpload", "OperationAborted",
    "RequestTimeTooSkewed", "RequestTimeout", "RequestThrottled", "ServiceUnavailable",
    "SlowDown", "Throttling", "ThrottlingException", "TooManyRequestsException",
    "XAmzContentSHA256Mismatch",
})
# A conditional write (If-None-Match: *) that found the key taken, or
# another conditional write of it under way (real S3 answers 409 then).
_CONDITION_FAILED_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict",
                                     "409"})
# A server that does not know conditional writes.
_NO_CONDITIONS_CODES = frozenset({"NotImplemented", "501"})
# botocore failures that come from the local setup, not from the network.
_PERMANENT_BOTOCORE = (bexc.NoRegionError, bexc.ParamValidationError, bexc.ProfileNotFound,
                       bexc.UnknownSignatureVersionError, bexc.InvalidRegionError)


def _looks_like_credential(key: object) -> bool:
    return _CREDENTIAL_KEY.search(str(key)) is not None


def _error_class(code: str, status: Optional[int]) -> Type[HostError]:
    """The HostError subclass for an S3 error ``code`` and HTTP ``status``."""
    if code in _NOT_FOUND_CODES:
        return HostNotFoundError
    if code in _PERMANENT_CODES:
        return PermanentHostError
    if code in _TRANSIENT_CODES:
        return TransientHostError
    if status == 404:
        return HostNotFoundError
    if status in (408, 429) or (status or 0) >= 500:
        return TransientHostError
    if status is not None and 400 <= status < 500:
        return PermanentHostError
    return TransientHostError


def _status(exc: bexc.ClientError) -> Optional[int]:
    """The HTTP status of a ClientError, or None."""
    status: Optional[int] = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status


class S3Host(Host):
    """Store copies as objects of one bucket, under an optional key prefix.

    :param bucket: the bucket's name
    :param prefix: the key prefix, without leading or trailing ``/``; may be
        nested (``a/b``) or empty
    :param endpoint_url: an S3-compatible service's URL (default: AWS)
    :param region: the bucket's region (default: from the AWS configuration)
    :param addressing_style: ``path``, ``virtual`` or ``auto``
    :param profile: the AWS profile to use (default: the standard chain)
    :param name: the host name recorded with uploads (default ``s3://BUCKET/PREFIX``)
    :param timeout: seconds to wait for a connection (at most 60) and for
        each read from the socket
    :param max_connections: how many transfers may run at once
    :param multipart_threshold: files of at least this many bytes are sent
        in parts (default 64 MiB)
    :param multipart_chunksize: the size of each part (default 16 MiB,
        at least 5 MiB)
    :param max_attempts: requests per call, first try included (default:
        the AWS configuration's, else botocore's)
    :param weight: preference among equally healthy hosts
    :raises InvalidInputError: for a bad bucket, prefix, option or profile
    """

    can_delete = True
    can_check = True
    can_list = True
    can_stage = True
    can_stream = True
    url_prefix: str  # set by __init__: every S3 host has one

    def __init__(self, bucket: str, prefix: Optional[str] = "", *,
                 endpoint_url: Optional[str] = None, region: Optional[str] = None,
                 addressing_style: Optional[str] = None, profile: Optional[str] = None,
                 name: Optional[str] = None, timeout: Optional[float] = None,
                 max_connections: Optional[int] = None, multipart_threshold: int = 64 * MiB,
                 multipart_chunksize: int = 16 * MiB, max_attempts: Optional[int] = None,
                 weight: Optional[float] = None) -> None:
        self.bucket = _check_bucket(bucket)
        self.prefix = _check_prefix(prefix)
        self.name = name or "s3://%s%s" % (self.bucket, "/" + self.prefix if self.prefix else "")
        if timeout is not None:
            self.timeout = _positive(timeout, "timeout", float)
        if max_connections is not None:
            self.max_connections = _positive(max_connections, "max_connections", int)
        if weight is not None:
            self.weight = _positive(weight, "weight", float)
        self.endpoint_url = _check_endpoint(endpoint_url)
        self.region = _optional_text(region, "region")
        self.profile = _optional_text(profile, "profile")
        self.addressing_style = addressing_style or "auto"
        if self.addressing_style not in ADDRESSING_STYLES:
            raise InvalidInputError("addressing_style must be one of %s, not %r"
                                    % ("/".join(ADDRESSING_STYLES), addressing_style))
        threshold = _positive(multipart_threshold, "multipart_threshold", int)
        chunksize = _positive(multipart_chunksize, "multipart_chunksize", int)
        if not MIN_PART_SIZE <= chunksize <= MAX_PART_SIZE:
            raise InvalidInputError("multipart_chunksize must be between 5 MiB and 5 GiB, not %d"
                                    % chunksize)
        retries: Dict[str, Union[str, int]] = {"mode": "standard"}
        if max_attempts is not None:
            # botocore's own "max_attempts" counts retries only.
            retries["total_max_attempts"] = _positive(max_attempts, "max_attempts", int)

        # The key prefix ends with "/" unless the objects sit at the top of
        # the bucket; URLs are made by plain concatenation, so accepts() can
        # compare strings exactly.
        self._key_prefix = self.prefix + "/" if self.prefix else ""
        self.url_prefix = "s3://%s/%s" % (self.bucket, self._key_prefix)
        self._transfer = TransferConfig(multipart_threshold=threshold,
                                        multipart_chunksize=chunksize,
                                        max_concurrency=TRANSFER_THREADS, use_threads=True)
        config = Config(
            s3={"addressing_style": self.addressing_style},
            retries=retries,
            # A connection that takes a minute to open will not open.
            connect_timeout=min(self.timeout, 60.0),
            read_timeout=self.timeout,
            # Every transfer the engine runs at once may use several
            # connections for its parts (an upload's TRANSFER_THREADS, a
            # ranged download's max_connections); none should wait for a
            # free one, and each thread reuses one.
            max_pool_connections=max(10, self.max_connections
                                     * max(TRANSFER_THREADS, self.max_connections)),
        )
        try:
            session = boto3.Session(profile_name=self.profile)
            self._client = session.client("s3", region_name=self.region,
                                          endpoint_url=self.endpoint_url, config=config)
        except bexc.ProfileNotFound:
            raise InvalidInputError("AWS profile %r not found" % self.profile) from None
        except bexc.BotoCoreError as exc:
            raise InvalidInputError("cannot set up the S3 client of %s: %s"
                                    % (self.name, exc)) from None
        self._track_sending(self._client)
        #: Connections the ranged reads of large downloads may use at once,
        #: all downloads together (see _RangedDownload).
        self._range_slots = threading.BoundedSemaphore(self.max_connections)
        #: Whether small uploads ask for a free key (If-None-Match: *) rather
        #: than look first; off once the server refuses it.
        self._conditional = True
        self._lock = threading.Lock()
        self._closed = False
        log.debug("S3 host %s: endpoint %s, region %s, addressing %s", self.name,
                  self._client.meta.endpoint_url, self._client.meta.region_name,
                  self.addressing_style)

    @staticmethod
    def _track_sending(client: Any) -> None:
        """Have a request body that reports its reads (ReadFileChunk) report
        only while the request is sent, not while it is signed (which reads
        the body to hash it). boto3's transfers register the same two
        handlers under the same ids: they are registered once."""
        events = client.meta.events
        events.register_first("request-created.s3", signal_not_transferring,
                              unique_id="s3upload-not-transferring")
        events.register_last("request-created.s3", signal_transferring,
                             unique_id="s3upload-transferring")

    @classmethod
    def from_spec(cls, scheme: str, target: str, **options: Any) -> "S3Host":
        """Build from ``s3://BUCKET/PREFIX?QUERY`` (``target`` is what follows ``s3:``).

        :param scheme: ``"s3"``
        :param target: ``//BUCKET/PREFIX`` with an optional query
        :param options: keyword options (see :class:`S3Host`)
        :return: a new :class:`S3Host`
        :raises InvalidInputError: for a malformed spec, an unknown option, an
            option given both in the query and as a keyword, or anything that
            looks like a credential
        """
        for key in options:
            _check_option_key(key, SPEC_KEYS + OPTION_KEYS, "option")
        if not isinstance(target, str) or not target.startswith("//"):
            raise InvalidInputError("an S3 host spec looks like s3://BUCKET/PREFIX")
        try:
            parts = urlsplit(target)
        except ValueError:
            raise InvalidInputError("an S3 host spec looks like s3://BUCKET/PREFIX") from None
        # Say nothing of what precedes "@": it would be a key or a secret.
        if "@" in parts.netloc:
            raise InvalidInputError("credentials in an S3 host spec are refused. "
                                    + _CREDENTIALS_HINT)
        if parts.fragment:
            raise InvalidInputError("an S3 host spec has no #fragment")
        query: Dict[str, Any] = _parse_query(parts.query)
        for key in query:
            if key in options:
                raise InvalidInputError("S3 option %r is given both in the spec and as an option"
                                        % key)
        return cls(parts.netloc, parts.path, **query, **options)

    @property
    def client(self) -> Any:
        """The host's boto3 S3 client, for inspection and for calls the host does not make.

        :return: a botocore ``S3`` client
        """
        return self._client

    # -- keys and URLs --------------------------------------------------------

    def _key_of_name(self, name: str) -> str:
        if not is_hash(name):
            raise InvalidInputError("S3 objects are named by SHA-256, not %r" % (name,))
        return self._key_prefix + name

    def _key_of_url(self, url: str) -> str:
        return self._key_prefix + self.object_name(url)

    def _url_of_key(self, key: str) -> str:
        return "s3://%s/%s" % (self.bucket, key)

    # -- operations -----------------------------------------------------------

    def upload(self, local_path: PathLike, name: str) -> Location:
        """Store ``local_path`` as ``PREFIX/name``, unless it is there already.

        An object already present is not sent again only when the server
        holds a SHA-256 of the whole object (a single-part upload's
        ``ChecksumSHA256``) equal to ``name``. The same size is no proof:
        an object with no such checksum (written in parts, or by a client
        that declared none) is overwritten.

        A file below ``multipart_threshold`` goes up in one ``PutObject``
        with the SHA-256 of its bytes (the server checks it) that asks for
        the key only if it is free (``If-None-Match: *``): one request when
        the object is new, the usual case. Only when the server answers that
        something is there does a ``HEAD`` look at it (kept if it is the
        file, else replaced). Larger files go through boto3's managed
        transfer, in parts, after a ``HEAD``.

        :param local_path: the file to send
        :param name: its SHA-256 hex digest
        :return: the :class:`~cloudmanager.hosts.base.Location` of the copy
        :raises InvalidInputError: if ``name`` is not a SHA-256 hex digest
        :raises HostError: on failure
        """
        key = self._key_of_name(name)
        url = self._url_of_key(key)
        local_path = os.fspath(local_path)
        try:
            size = os.path.getsize(local_path)
        except OSError as exc:
            raise TransientHostError(self.name, "cannot read %s: %s" % (local_path, exc)) from exc
        small = size < self._transfer.multipart_threshold
        if small and self._conditional and self._put(local_path, size, key, url,
                                                     if_absent=True):
            return Location(self.name, url)
        if self._holds(key, url, name, size):
            return Location(self.name, url)
        if small:
            self._put(local_path, size, key, url, if_absent=False)
            return Location(self.name, url)
        with self._translated("upload to", url):
            # boto3 reads the file on threads of its own: the meter of this
            # call (progress, bandwidth limit) goes with it as its callback.
            self._client.upload_file(local_path, self.bucket, key,
                                     ExtraArgs={"ChecksumAlgorithm": "SHA256"},
                                     Config=self._transfer, Callback=meter.current())
        log.debug("%s: stored %s (%d bytes)", self.name, url, size)
        return Location(self.name, url)

    def _holds(self, key: str, url: str, name: str, size: int) -> bool:
        """Whether ``key`` holds the object ``name`` already (a HEAD): only a
        stored full-object SHA-256 equal to ``name`` proves it."""
        present = self._present(key, url)
        # A positive match only: a same-sized object with no checksum may
        # hold other bytes, and a skip would record it as a good copy.
        if present is not None and present.size == size and present.sha256 == name:
            log.debug("%s: %s is already there (%d bytes, SHA-256 checked), not sent again",
                      self.name, url, size)
            return True
        if present is not None:
            log.info("%s: replacing %s (%d bytes, sha256 %s)", self.name, url,
                     present.size, present.sha256 or "unknown")
        return False

    def _put(self, local_path: str, size: int, key: str, url: str, if_absent: bool) -> bool:
        """One ``PutObject`` of a file below the multipart threshold.

        botocore sends the SHA-256 of the bytes it reads, which the server
        checks and keeps (the cheap verify compares it with the name). Not
        ``name`` declared as the checksum: a server that does not check it
        (moto) would then keep it for whatever bytes were sent. With
        ``if_absent``, the key is written only if it is free
        (``If-None-Match: *``).

        :return: True if the object was stored; False if ``if_absent`` and
            the key is taken (or another conditional write of it is under
            way), or the server does not do conditional writes
        :raises HostError: on any other failure
        """
        extra: Dict[str, Any] = {"IfNoneMatch": "*"} if if_absent else {}
        metered = meter.current()
        # ReadFileChunk is the body of boto3's own uploads: it reports the
        # bytes read while the request is sent (not signing's reads, see
        # _track_sending) and takes them back when a retry rewinds it.
        callbacks = [functools.partial(_tick, metered)] if metered is not None else None
        try:
            with self._translated("upload to", url), \
                    ReadFileChunk.from_filename(local_path, 0, size, callbacks=callbacks,
                                                enable_callbacks=False) as body:
                self._client.put_object(Bucket=self.bucket, Key=key, Body=body,
                                        ContentLength=size,
                                        ChecksumAlgorithm="SHA256", **extra)
        except HostError as exc:
            code = _client_error_code(exc.__cause__)
            if if_absent and code in _CONDITION_FAILED_CODES:
                log.debug("%s: %s is taken (%s): looking at it", self.name, url, code)
                return False
            if if_absent and code in _NO_CONDITIONS_CODES:
                # A server without conditional writes: from now on a HEAD
                # precedes each small upload, as it always did.
                log.info("%s: the server refuses conditional writes (%s); looking before "
                         "each upload", self.name, code)
                self._conditional = False
                return False
            raise
        log.debug("%s: stored %s (%d bytes)", self.name, url, size)
        return True

    def stage(self, stream: Stream, size: int) -> Staged:
        """Send ``stream`` to a staging key, ``PREFIX/.cloudmanager-staging-<random>.tmp``.

        The stream is read once, forward: boto3 keeps in memory what it may
        have to send again (a part, at most a few at once), never rewinds.
        As for :meth:`upload`, the server checks a SHA-256 of what it
        receives, and files of ``multipart_threshold`` bytes or more go up in
        parts. :meth:`Staged.publish` then copies the object to its hash's
        key on the server and deletes the staging key. A staging key left
        by a crash is never listed (its name is not a SHA-256); a lifecycle
        rule on its key prefix can expire such leftovers.

        :param stream: the bytes, read once to their end
        :param size: the bytes expected: it sizes the parts (S3 allows
            10,000 per object)
        :return: the :class:`~cloudmanager.hosts.base.Staged` object
        :raises HostError: on failure (the staging key is deleted, best effort)
        """
        key = self._key_prefix + staging_name()
        url = self._url_of_key(key)
        try:
            with self._translated("upload to", url), \
                    create_transfer_manager(self._client, self._transfer) as manager:
                # The manager reads the stream on threads of its own: the
                # meter of this call goes with it as a subscriber.
                metered = meter.current()
                subscribers = [_ProvideSize(size)] + (
                    [ProgressCallbackInvoker(metered)] if metered is not None else [])
                manager.upload(stream, self.bucket, key,
                               extra_args={"ChecksumAlgorithm": "SHA256"},
                               subscribers=subscribers).result()
        except BaseException:
            self._delete_quietly(key)
            raise
        log.debug("%s: staged %s", self.name, url)
        return _S3Staged(self, key)

    def _publish_staged(self, temp: str, name: str) -> Location:
        """Copy the staged object ``temp`` to ``name``'s key on the server, then
        delete it (see :class:`_S3Staged`)."""
        key = self._key_of_name(name)
        url = self._url_of_key(key)
        with self._translated("publish", url):
            # Stored as upload() stores: one part (with the server's SHA-256
            # of the whole object) below multipart_threshold, parts above.
            self._client.copy({"Bucket": self.bucket, "Key": temp}, self.bucket, key,
                              ExtraArgs={"ChecksumAlgorithm": "SHA256"}, Config=self._transfer)
        present = self._present(key, url)
        if present is not None and present.sha256 not in (None, name):
            # The server hashed other bytes than the caller did: not a copy.
            self._delete_quietly(key)
            raise TransientHostError(self.name, "the bytes staged for %s hash to %s on the "
                                     "server; not published" % (url, present.sha256))
        self._delete_quietly(temp)
        log.debug("%s: published %s", self.name, url)
        return Location(self.name, url)

    def _delete_quietly(self, key: str) -> None:
        """Delete ``key``, best effort (a failure is logged)."""
        try:
            with self._translated("delete", self._url_of_key(key)):
                self._client.delete_object(Bucket=self.bucket, Key=key)
        except HostError as exc:
            log.warning("%s: could not delete %s: %s", self.name, key, exc.message)

    def _present(self, key: str, url: str) -> Optional[ObjectInfo]:
        """The ObjectInfo of ``key``, or None if it is missing or cannot be checked."""
        try:
            with self._translated("check", url):
                try:
                    head = self._client.head_object(Bucket=self.bucket, Key=key,
                                                    ChecksumMode="ENABLED")
                except bexc.ClientError as exc:
                    # 403: a key that may only write gets it for a HEAD,
                    # and for a missing object when it may not list. The
                    # upload itself will tell whether writing is allowed.
                    if _status(exc) in (403, 404):
                        log.debug("%s: HEAD %s answered %s: sending it", self.name, url,
                                  _status(exc))
                        return None
                    raise
        except HostNotFoundError:
            return None
        return self._object_info(head)

    def download(self, url: str, dest_path: PathLike,
                 max_bytes: Optional[int] = None) -> Received:
        """Stream the object into ``dest_path``, atomically.

        An object expected to be ``multipart_threshold`` bytes or more
        (``max_bytes``) comes in byte ranges, one per connection, on up to
        ``max_connections`` connections at once, each written in place in
        the temp file and hashed in order as far as it is written (see
        :class:`_RangedDownload`); a smaller one in one sequential
        ``GetObject``, hashed as it arrives.

        :param url: an ``s3://`` URL this host :meth:`accepts`
        :param dest_path: the destination file; replaced only on success
        :param max_bytes: the expected size; a larger object is refused
            before its bytes are read
        :return: the SHA-256 and size of the bytes written
        :raises HostNotFoundError: if the object is not there
        :raises TransientHostError: if it is larger than ``max_bytes``, or
            the transfer or the local disk failed
        :raises HostError: on any other failure
        """
        key = self._key_of_url(url)
        if max_bytes is not None and max_bytes >= self._transfer.multipart_threshold \
                and self.max_connections > 1:
            return self._download_ranged(key, url, dest_path, max_bytes)
        body, length = self._open_body(key, url, max_bytes)
        try:
            with self._translated("download", url):
                return self.receive(body, url, dest_path, max_bytes, length=length)
        finally:
            body.close()

    def open_stream(self, url: str, max_bytes: Optional[int] = None) -> HostStream:
        """The object's body, as one ``GetObject`` sends it; see
        :meth:`Host.open_stream`.

        :raises HostNotFoundError: if the object is not there
        :raises TransientHostError: if it is larger than ``max_bytes``
        :raises HostError: on any other failure
        """
        body, _ = self._open_body(self._key_of_url(url), url, max_bytes)
        return HostStream(body, self.name, url,
                          translate=lambda exc: self._transfer_error(exc, url))

    def _open_body(self, key: str, url: str, max_bytes: Optional[int]) -> Tuple[Any, Optional[int]]:
        """``(body, its length)`` of a ``GetObject`` of ``key``, its bytes unread."""
        with self._translated("download", url):
            # ChecksumMode: botocore also checks the bytes against the
            # stored checksum (single-part objects), as they are read.
            response = self._client.get_object(Bucket=self.bucket, Key=key,
                                               ChecksumMode="ENABLED")
            body = response["Body"]
            try:
                length = response.get("ContentLength")
                self._check_length(url, length, max_bytes)
            except BaseException:
                body.close()
                raise
        return body, length

    def _transfer_error(self, exc: Exception, url: str) -> HostError:
        """The error of a body's read that failed: the transfer's, never a missing object."""
        if isinstance(exc, (bexc.ClientError, bexc.BotoCoreError)):
            error = self._error(exc, "download", url)
            if isinstance(error, TransientHostError):
                return error
        return TransientHostError(self.name, "cannot download %s: %s" % (url, exc))

    def _check_length(self, url: str, length: Optional[int], max_bytes: Optional[int]) -> None:
        if max_bytes is not None and length is not None and length > max_bytes:
            raise TransientHostError(self.name, "%s has %d bytes, not the %d expected"
                                     % (url, length, max_bytes))

    def _download_ranged(self, key: str, url: str, dest_path: PathLike,
                         max_bytes: int) -> Received:
        """:meth:`download` of a large object in byte ranges, in parallel.

        The expected size is split into one range per connection (at most
        ``max_connections`` and :data:`RANGED_STREAMS`, ranges of at least
        ``multipart_chunksize``),
        as rclone's multi-thread downloads do: few requests, each a long
        sequential read. The first range's answer tells the object's real
        size (``Content-Range``): a larger one is refused there, a smaller
        one split anew.
        """
        connections = max(1, min(self.max_connections, RANGED_STREAMS,
                                 max_bytes // self._transfer.multipart_chunksize))
        first_size = -(-max_bytes // connections)
        slot = self._range_slots
        slot.acquire()
        try:
            with self._translated("download", url):
                first = self._get_range(key, 0, first_size)
                try:
                    total = _range_total(first)
                    if total is None:
                        raise TransientHostError(self.name, "%s: the server gave no size for "
                                                 "a ranged read" % url)
                    self._check_length(url, total, max_bytes)
                except BaseException:
                    first["Body"].close()
                    raise
        except BaseException:
            slot.release()
            raise
        # The first range's connection and slot go to the worker that reads it.
        ranged = _RangedDownload(self, key, url, first, total, connections)
        running = False
        try:
            with fsutil.atomic_write(dest_path, readable=True) as out:
                running = True
                digest = ranged.run(out.fileno())
        except OSError as exc:
            raise TransientHostError(self.name, "cannot copy %s: %s" % (url, exc)) from exc
        finally:
            if not running:  # no temp file (EMFILE, ENOSPC...): nobody took them over
                first["Body"].close()
                slot.release()
        return Received(digest, total)

    def _get_range(self, key: str, start: int, size: int) -> Dict[str, Any]:
        """The GetObject answer for ``size`` bytes of ``key`` from ``start``
        (no ChecksumMode: a stored checksum is of the whole object)."""
        response: Dict[str, Any] = self._client.get_object(
            Bucket=self.bucket, Key=key, Range="bytes=%d-%d" % (start, start + size - 1))
        return response

    def stat(self, url: str) -> ObjectInfo:
        """The object's size, and its SHA-256 when the server keeps a full-object one.

        :param url: an ``s3://`` URL this host :meth:`accepts`
        :return: an :class:`~cloudmanager.hosts.base.ObjectInfo`; ``sha256``
            is None for multipart objects, whose checksum is of the parts
        :raises HostNotFoundError: if the object is not there
        :raises PermanentHostError: if the bucket is not there
        :raises HostError: on any other failure
        """
        key = self._key_of_url(url)
        try:
            with self._translated("check", url):
                head = self._client.head_object(Bucket=self.bucket, Key=key,
                                                ChecksumMode="ENABLED")
        except HostNotFoundError:
            # A HEAD has no body to say which is missing, the object or the
            # bucket; a missing bucket must not condemn every copy in it.
            self._check_bucket_exists()
            raise
        return self._object_info(head)

    def _check_bucket_exists(self) -> None:
        try:
            with self._translated("check bucket", "s3://" + self.bucket):
                self._client.head_bucket(Bucket=self.bucket)
        except HostNotFoundError:
            raise PermanentHostError(self.name, "bucket %s does not exist" % self.bucket) from None
        except HostError as exc:
            # Not allowed to look, or not now: the object is still missing.
            log.debug("%s: cannot check the bucket: %s", self.name, exc)

    @staticmethod
    def _object_info(head: Mapping[str, Any]) -> ObjectInfo:
        """ObjectInfo from a head_object response."""
        return ObjectInfo(int(head.get("ContentLength", 0)), _full_object_sha256(head))

    def delete(self, url: str) -> None:
        """Delete the object; a missing one is not an error.

        :param url: an ``s3://`` URL this host :meth:`accepts`
        :raises HostError: on failure (a missing bucket is a
            :class:`~cloudmanager.errors.PermanentHostError`)
        """
        key = self._key_of_url(url)
        try:
            with self._translated("delete", url):
                self._client.delete_object(Bucket=self.bucket, Key=key)
        except HostNotFoundError:
            pass
        log.debug("%s: deleted %s", self.name, url)

    def list(self) -> Iterator[Tuple[str, int]]:
        """Yield ``(sha256, size)`` for each object directly under the prefix.

        Keys deeper under the prefix, and keys that are not SHA-256 names,
        are skipped.

        :raises HostError: on failure
        """
        paginator = self._client.get_paginator("list_objects_v2")
        with self._translated("list", self.url_prefix):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key_prefix,
                                           Delimiter="/"):
                for item in page.get("Contents", ()):
                    name = item["Key"][len(self._key_prefix):]
                    if is_hash(name):
                        yield name, int(item.get("Size", 0))

    def close(self) -> None:
        """Close the client's connections. Calling it twice is harmless."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._client.close()

    # -- error translation ----------------------------------------------------

    @contextlib.contextmanager
    def _translated(self, action: str, url: str) -> Iterator[None]:
        """Turn any boto3/botocore failure inside the block into a HostError."""
        if self._closed:
            raise PermanentHostError(self.name, "host is closed")
        try:
            yield
        except HostError:
            raise
        except (bexc.ClientError, bexc.BotoCoreError, S3UploadFailedError) as exc:
            raise self._error(exc, action, url) from exc
        except OSError as exc:
            # A local file that went away or could not be read mid-upload.
            raise TransientHostError(self.name, "cannot %s %s: %s" % (action, url, exc)) from exc

    def _error(self, exc: Exception, action: str, url: str) -> HostError:
        """The HostError that says what ``exc`` means for ``action`` on ``url``.

        The one place that classifies boto3 and botocore failures.
        """
        what = "cannot %s %s" % (action, url)
        if isinstance(exc, S3UploadFailedError):
            # boto3 raises it while handling the ClientError of a part, so
            # the real error is its context; failing that, its message.
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, (bexc.ClientError, bexc.BotoCoreError)):
                return self._error(cause, action, url)
            match = _CLIENT_ERROR_CODE.search(str(exc))
            cls = _error_class(match.group(1), None) if match else TransientHostError
            return cls(self.name, "%s: %s" % (what, exc))
        if isinstance(exc, bexc.ClientError):
            error = exc.response.get("Error", {})
            code, status = str(error.get("Code", "")), _status(exc)
            message = error.get("Message") or "HTTP %s" % status
            return _error_class(code, status)(self.name, "%s: %s (%s)" % (what, message, code))
        if isinstance(exc, (bexc.NoCredentialsError, bexc.PartialCredentialsError)):
            return PermanentHostError(self.name, "%s: %s. %s" % (what, exc, _CREDENTIALS_HINT))
        if isinstance(exc, _PERMANENT_BOTOCORE):
            return PermanentHostError(self.name, "%s: %s" % (what, exc))
        if isinstance(exc, (bexc.ConnectionError, bexc.ReadTimeoutError,
                            bexc.ConnectionClosedError)):
            return HostUnavailableError(self.name, "%s: %s" % (what, exc))
        # Streaming failures, checksum mismatches in transit, the rest.
        return TransientHostError(self.name, "%s: %s" % (what, exc))

    # -- listings for checks ----------------------------------------------------

    #: A name prefix narrows a listing to its keys (ListObjectsV2's ``Prefix``).
    list_narrows = True

    def list_objects(self, prefix: str = "") -> Iterator[ListedObject]:
        """Yield each object directly under the key prefix whose name starts
        with ``prefix``, with its size: one ListObjectsV2 request per
        :attr:`list_page` keys, only those under ``PREFIX/prefix``.

        A listing gives each key's size and ETag, not the SHA-256 a HEAD
        returns (``sha256`` is None): it tells a missing or wrong-sized copy,
        not one of the right size holding other bytes. Keys deeper under the
        prefix, staging keys and any other non-SHA-256 names are skipped.

        :param prefix: lowercase hex digits
        :raises InvalidInputError: if ``prefix`` is not lowercase hex
        :raises PermanentHostError: if the bucket is not there
        :raises HostError: on any other failure
        """
        key_prefix = self._key_prefix + check_name_prefix(prefix)
        # Idempotent (unique_id): the first listing registers it.
        self._client.meta.events.register("before-parse.s3.ListObjectsV2", _unread_fields_dropped,
                                          unique_id="cloudmanager-listing")
        paginator = self._client.get_paginator("list_objects_v2")
        with self._translated("list", self.url_prefix + prefix):
            pages = iter(paginator.paginate(Bucket=self.bucket, Prefix=key_prefix, Delimiter="/",
                                            PaginationConfig={"PageSize": self.list_page}))
            while True:
                # Only this thread's page requests, while it makes them, are
                # parsed without the fields a listing does not read: any other
                # call on the client gets whole answers.
                _LISTING.active = True
                try:
                    page = next(pages, None)
                finally:
                    _LISTING.active = False
                if page is None:
                    return
                for item in page.get("Contents", ()):
                    name = item["Key"][len(self._key_prefix):]
                    if is_hash(name):
                        yield ListedObject(name, int(item.get("Size", 0)))


#: Whether this thread is fetching a page for :meth:`S3Host.list_objects`.
_LISTING = threading.local()
#: Fields of a ListObjectsV2 answer that no check reads. botocore parses
#: every one, and its date parser (dateutil) took three quarters of the
#: client's CPU for a listing: about 0.1 s per 2,000 keys here.
_UNREAD_LISTING_FIELDS = re.compile(
    rb"<(LastModified|ETag|StorageClass|Owner|ChecksumAlgorithm|ChecksumType|RestoreStatus)>"
    rb".*?</\1>", re.DOTALL)


def _unread_fields_dropped(response_dict: Dict[str, Any], **_: Any) -> None:
    """botocore's ``before-parse`` hook of ListObjectsV2: drop the fields
    :meth:`S3Host.list_objects` does not read from a successful answer's XML.
    Keys are XML-escaped in it (a ``<`` in a key is ``&lt;``): no key can
    hold a tag that this would take for one."""
    body = response_dict.get("body")
    if getattr(_LISTING, "active", False) and response_dict.get("status_code") == 200 \
            and isinstance(body, bytes):
        response_dict["body"] = _UNREAD_LISTING_FIELDS.sub(b"", body)


class _S3Staged(Staged):
    """An object under a staging key of an S3 host."""

    host: S3Host

    def _publish(self, name: str) -> Location:
        return self.host._publish_staged(self.temp, name)

    def _discard(self) -> None:
        self.host._delete_quietly(self.temp)


class _RangedDownload:
    """One ranged, parallel download (:meth:`S3Host.download` of a large object).

    One thread per range GETs it and writes it in place in the temp file
    (``os.pwrite``), chunk by chunk, ticking the call's meter (progress,
    bandwidth limit) for each chunk. Each holds one of the host's range
    slots while it reads, so the ranged reads of every download at once
    use at most ``max_connections`` connections to the host.

    The caller's thread hashes the file in order, as far as it is written
    (each range is written front to back): it reads the bytes back from
    the temp file, from the page cache, just behind the writers. That is a
    second read of each byte (from memory, not the disk, while the file
    fits in the page cache): the price of hashing out-of-order ranges
    without holding them in memory.

    Any failure (a range's request, the disk, the meter: a cancelled
    transfer) stops every worker; the caller waits for all of them to end
    before it returns or raises, so the temp file is never removed while a
    worker may still write to it (nor its descriptor closed).

    :param host: the host (its client, its error translation, its range slots)
    :param key: the object's key
    :param url: its URL, for messages
    :param first: the answer to the first range's GET, its body unread; the
        caller holds a range slot for it, which the worker reading it releases
    :param total: the object's size
    :param connections: how many ranges (and threads)
    """

    def __init__(self, host: S3Host, key: str, url: str, first: Dict[str, Any], total: int,
                 connections: int) -> None:
        self.host, self.key, self.url = host, key, url
        self.first: Optional[Dict[str, Any]] = first
        self.total = total
        first_size = min(total, int(first.get("ContentLength") or 0))
        rest = max(0, connections - 1) if total > first_size else 0
        self.ranges: List[Tuple[int, int]] = [(0, first_size)]
        if rest:
            step = -(-(total - first_size) // rest)
            self.ranges += [(start, min(start + step, total))
                            for start in range(first_size, total, step)]
        self.written = [0] * len(self.ranges)
        self.meter = meter.current()  # the caller's thread has the call's meter
        self.cond = threading.Condition()
        self.error: Optional[BaseException] = None
        self.stop = False

    def run(self, fd: int) -> str:
        """Fetch every range into ``fd``; the SHA-256 hex digest of the object.

        :raises HostError: for a failed request or a short range
        :raises BaseException: what a worker's meter raised, or what
            interrupted the caller (the workers are stopped first)
        """
        threads = [threading.Thread(target=self._work, args=(index, fd), daemon=True,
                                    name="cloudmanager-s3-range")
                   for index in range(len(self.ranges))]
        try:
            for thread in threads:
                thread.start()
            return self._hash(fd)
        finally:
            with self.cond:
                self.stop = True
                self.cond.notify_all()
            for thread in threads:
                if thread.ident is not None:
                    thread.join()
            if self.first is not None:  # no worker took it
                self.first["Body"].close()
                self.host._range_slots.release()

    def _hash(self, fd: int) -> str:
        digest = hashlib.sha256()
        position = 0
        for index, (start, end) in enumerate(self.ranges):
            while position < end:
                with self.cond:
                    while self.error is None and start + self.written[index] <= position:
                        self.cond.wait()
                    if self.error is not None:
                        raise self.error
                    written = start + self.written[index]
                while position < written:
                    data = os.pread(fd, min(fsutil.CHUNK, written - position), position)
                    if not data:
                        raise TransientHostError(self.host.name, "%s: the temp file ends at "
                                                 "byte %d" % (self.url, position))
                    digest.update(data)
                    position += len(data)
        if position != self.total:
            raise TransientHostError(self.host.name, "%s: %d bytes of %d hashed"
                                     % (self.url, position, self.total))
        return digest.hexdigest()

    def _work(self, index: int, fd: int) -> None:
        try:
            if index == 0:
                with self.cond:
                    response, self.first = self.first, None
                if response is None:  # run() gave it up already
                    return
                try:
                    self._copy(index, response, fd)
                finally:
                    self.host._range_slots.release()
            else:
                with self.host._range_slots:
                    if self.stop:
                        return
                    start, end = self.ranges[index]
                    self._copy(index, self.host._get_range(self.key, start, end - start), fd)
        except BaseException as exc:
            if isinstance(exc, (bexc.ClientError, bexc.BotoCoreError)):
                exc = self.host._error(exc, "download", self.url)
            elif isinstance(exc, OSError):
                exc = TransientHostError(self.host.name, "cannot copy %s: %s"
                                         % (self.url, exc))
            with self.cond:
                if self.error is None:
                    self.error = exc
                self.stop = True
                self.cond.notify_all()

    def _copy(self, index: int, response: Dict[str, Any], fd: int) -> None:
        start, end = self.ranges[index]
        body = response["Body"]
        try:
            if response.get("ContentLength") != end - start:
                raise TransientHostError(self.host.name, "%s: asked for %d bytes from %d, "
                                         "the server sends %s" % (self.url, end - start, start,
                                                                  response.get("ContentLength")))
            offset = start
            while offset < end:
                chunk = body.read(min(fsutil.CHUNK, end - offset))
                if not chunk:
                    raise TransientHostError(self.host.name, "%s ended at byte %d of %d"
                                             % (self.url, offset, self.total))
                view = memoryview(chunk)
                at = offset
                while view:
                    done = os.pwrite(fd, view, at)
                    view, at = view[done:], at + done
                if self.meter is not None:
                    self.meter(len(chunk))
                offset += len(chunk)
                with self.cond:
                    self.written[index] = offset - start
                    self.cond.notify_all()
                    if self.stop:
                        return
        finally:
            body.close()


def _range_total(response: Mapping[str, Any]) -> Optional[int]:
    """The object's whole size from a ranged GET's ``Content-Range`` (``bytes a-b/total``)."""
    match = re.fullmatch(r"bytes \d+-\d+/(\d+)", str(response.get("ContentRange") or ""))
    return int(match.group(1)) if match else None


class _ProvideSize(BaseSubscriber):
    """Tells a transfer of a stream its size, so that its parts are sized to fit."""

    def __init__(self, size: int) -> None:
        self.size = size

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        future.meta.provide_transfer_size(self.size)


def _tick(metered: meter.Meter, bytes_transferred: int) -> None:
    """A ReadFileChunk callback: the bytes read go to the call's meter."""
    metered(bytes_transferred)


def _client_error_code(exc: Optional[BaseException]) -> Optional[str]:
    """The S3 error code of a ClientError (its HTTP status when it has none), or None."""
    if not isinstance(exc, bexc.ClientError):
        return None
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code or str(_status(exc))


def _full_object_sha256(head: Mapping[str, Any]) -> Optional[str]:
    """The hex SHA-256 of the whole object from a HEAD response, or None.

    A multipart upload's checksum is of its parts' checksums ("COMPOSITE"),
    not of the bytes. Real S3 marks it with a "-N" suffix and a checksum
    type; some servers (moto) send neither, so the multipart ETag ("-N")
    is checked as well.
    """
    value = head.get("ChecksumSHA256")
    if not value or "-" in value or head.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
        return None
    if "-" in head.get("ETag", "") or head.get("PartsCount"):
        return None
    try:
        digest = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return digest.hex() if len(digest) == 32 else None


# -- option checks -------------------------------------------------------------

def _check_option_key(key: object, allowed: Sequence[str], kind: str) -> None:
    if _looks_like_credential(key):
        raise InvalidInputError("S3 %s %r looks like a credential and is refused. %s"
                                % (kind, str(key)[:40], _CREDENTIALS_HINT))
    if key not in allowed:
        raise InvalidInputError("unknown S3 %s %r (known: %s)"
                                % (kind, str(key)[:40], ", ".join(allowed)))


def _parse_query(query: str) -> Dict[str, str]:
    """The spec's query as a dict; values are never quoted in errors."""
    result: Dict[str, str] = {}
    if not query:
        return result
    for field in query.split("&"):
        key, sep, value = field.partition("=")
        key = unquote(key)
        _check_option_key(key, SPEC_KEYS, "spec parameter")
        if not sep or not value:
            raise InvalidInputError("S3 spec parameter %r needs a value" % key)
        if key in result:
            raise InvalidInputError("S3 spec parameter %r is given twice" % key)
        result[key] = unquote(value)
    return result


def _check_bucket(bucket: object) -> str:
    if not isinstance(bucket, str) or not _BUCKET.fullmatch(bucket):
        raise InvalidInputError("not a valid S3 bucket name: %r" % (str(bucket)[:80],))
    return bucket


def _check_prefix(prefix: object) -> str:
    if prefix is None:
        return ""
    if not isinstance(prefix, str):
        raise InvalidInputError("an S3 key prefix is a string, not %r" % (prefix,))
    segments = [s for s in prefix.strip("/").split("/")] if prefix.strip("/") else []
    for segment in segments:
        if segment in (".", "..") or not _PREFIX_SEGMENT.fullmatch(segment):
            raise InvalidInputError(
                "not a valid S3 key prefix: %r (segments of letters, digits and . _ ~ + = @ , -)"
                % (prefix[:200],))
    return "/".join(segments)


def _check_endpoint(url: object) -> Optional[str]:
    if url is None:
        return None
    # The URL is never quoted back: it could hold a secret in the wrong place.
    if not isinstance(url, str):
        raise InvalidInputError("endpoint_url must be a string")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        raise InvalidInputError("endpoint_url is not a valid URL") from None
    if "@" in parts.netloc:
        raise InvalidInputError("credentials in endpoint_url are refused. " + _CREDENTIALS_HINT)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInputError("endpoint_url must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise InvalidInputError("endpoint_url must not have a query or a fragment")
    return url


def _optional_text(value: object, what: str) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not value or any(ch.isspace() for ch in value):
        raise InvalidInputError("%s must be a word, not %r" % (what, str(value)[:80]))
    return value


def _positive(value: object, what: str, kind: Any) -> Any:
    """``value`` as a positive ``kind`` (int or float), or InvalidInputError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInputError("%s must be a positive number, not %r" % (what, value))
    if kind is int and value != int(value):
        raise InvalidInputError("%s must be a whole number, not %r" % (what, value))
    if not math.isfinite(value) or value <= 0:
        raise InvalidInputError("%s must be a positive number, not %r" % (what, value))
    return kind(value)
