"""The pool's key: age encryption of copies, and object names that reveal nothing.

A pool with a key keeps only ciphertext on its hosts, in the **age** format
(age-encryption.org/v1) through pyrage, the Python binding of rage. Nothing
here is a construction of our own: if cloudmanager disappears, every copy
still opens with ``age -d -i KEYFILE``.

- **The key** is an age X25519 identity file, as ``age-keygen`` or
  ``cm key new`` writes it. Its public recipient (``age1...``) encrypts;
  more recipients (other nodes, a person's offline key) may be added, and
  each can decrypt every copy made after.
- **Object names.** A copy is stored under ``HMAC-SHA256(name_key,
  plaintext SHA-256)`` in hex: a host can neither read the file nor confirm
  it holds a known one by hashing it. ``name_key`` is derived from the
  identity with HKDF-SHA256, so every node with the same key computes the
  same names (an object already there is not sent twice).
- **key_id** names the key in records (also derived with HKDF, so it says
  nothing about the key): a node whose key_id differs knows a copy is
  "encrypted for another key" without trying to decrypt it.

The identity never leaves this module's objects: not in the database, a
log, a dump, ``stats()`` or an error (:meth:`PoolKey.__repr__` shows the
recipient only).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from typing import IO, Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, cast

from . import fsutil
from .errors import (
    ConfigError, IntegrityError, MissingDependencyError, UnconfirmedIntegrityError,
)
from .fsutil import HashingWriter, fsync_dir

log = logging.getLogger(__name__)

#: The one-line hint when pyrage is missing.
INSTALL_HINT = "encrypted pools need pyrage: pip install 'cloudmanager[encryption]'"
#: HKDF ``info`` strings: one derived key per purpose.
_NAME_INFO = b"cloudmanager object names v1"
_KEY_ID_INFO = b"cloudmanager key id v1"
#: Bytes age adds to a file at most: a header with one stanza per recipient
#: (under 200 bytes each, 4 KiB allowing for many) and 16 bytes per 64 KiB chunk.
AGE_HEADER_MAX = 4096
AGE_CHUNK = 64 * 1024
AGE_TAG = 16
#: Files at least this large are sealed and opened by the ``age`` command
#: when it is installed: it runs on another core while this process hashes
#: (pyrage holds the GIL, so nothing overlaps it), and it is faster (measured
#: on 256 MiB: encrypt 1,580 against 770 MB/s, decrypt 1,280 against 650).
#: Below it, starting a process costs more than it saves.
AGE_BINARY_MIN = 4 << 20
#: Files up to this size are encrypted in memory, in one call (see
#: :meth:`PoolKey.encrypt_file`).
SMALL_IN_MEMORY = 256 << 10
#: Linux's ``F_SETPIPE_SZ``: age's output pipe is widened to a megabyte, so
#: that each read takes a large chunk (hashlib releases the GIL on those).
_F_SETPIPE_SZ = 1031
_PIPE_SIZE = 1 << 20


def _pyrage() -> Any:
    try:
        import pyrage
    except ImportError as exc:
        raise MissingDependencyError(INSTALL_HINT) from exc
    return pyrage


def ciphertext_size_max(size: int) -> int:
    """The most bytes age can make of ``size`` bytes of plaintext (for a
    reservation before the ciphertext's real size is known).

    >>> ciphertext_size_max(0), ciphertext_size_max(65536), ciphertext_size_max(65537)
    (4112, 69648, 69665)
    """
    chunks = max(1, -(-size // AGE_CHUNK))
    return size + AGE_HEADER_MAX + chunks * AGE_TAG


def _hkdf(secret: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869) with an empty salt: a key for one purpose."""
    prk = hmac.new(b"\0" * 32, secret, hashlib.sha256).digest()
    out, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
    return out[:length]


def new_identity_file(path: str) -> str:
    """Write a new age identity to ``path`` (mode 0600; never over an existing
    file), as ``age-keygen -o`` does. :return: its public recipient.

    :raises ConfigError: if ``path`` exists
    """
    pyrage = _pyrage()
    path = os.path.abspath(path)
    if os.path.lexists(path):
        raise ConfigError("%s exists; a key is never overwritten (losing it loses the data)"
                          % path)
    identity = pyrage.x25519.Identity.generate()
    recipient = str(identity.to_public())
    text = ("# created by cloudmanager (cm key new)\n# public key: %s\n%s\n"
            % (recipient, identity)).encode("ascii")
    # Written whole and private beside it, then linked in: the key appears
    # complete or not at all, and a file made there meanwhile is never replaced.
    fd, temp = tempfile.mkstemp(prefix=".cm-key-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            raise ConfigError("%s exists; a key is never overwritten (losing it loses the "
                              "data)" % path) from None
        fsync_dir(os.path.dirname(path))
    finally:
        os.unlink(temp)
    return recipient


class PoolKey:
    """A pool's age identity and its readers.

    :param identity_path: an age identity file (``AGE-SECRET-KEY-1...``
        lines; ``#`` comments allowed), private to its owner
    :param recipients: more ``age1...`` recipients every copy is encrypted to
    :param age_binary: the ``age`` command for files of :data:`AGE_BINARY_MIN`
        bytes or more: ``"auto"`` finds it on the ``PATH``; None uses pyrage
        for every file. Both write the same format (age-encryption.org/v1)
    :raises ConfigError: if the file cannot be read, is readable by others,
        or holds no X25519 identity; if a recipient is malformed
    :raises MissingDependencyError: if pyrage is not installed
    """

    def __init__(self, identity_path: str, recipients: Sequence[str] = (),
                 age_binary: Optional[str] = "auto") -> None:
        pyrage = _pyrage()
        self.path = os.path.abspath(identity_path)
        try:
            st = os.stat(self.path)
            with open(self.path, encoding="ascii") as f:
                lines = [line.strip() for line in f]
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("cannot read the pool's key %s: %s" % (self.path, exc)) from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError("the pool's key %s is readable by others (mode %o); "
                              "chmod 600 it" % (self.path, st.st_mode & 0o777))
        secrets = [line for line in lines if line.startswith("AGE-SECRET-KEY-1")]
        if len(secrets) != 1:
            raise ConfigError("%s holds %d age X25519 identities; one is needed"
                              % (self.path, len(secrets)))
        try:
            self._identity = pyrage.x25519.Identity.from_str(secrets[0])
        except Exception:  # never echo the line: it is the secret
            raise ConfigError("%s holds a malformed age identity" % self.path) from None
        #: This key's own public recipient.
        self.recipient = str(self._identity.to_public())
        extra: List[Any] = []
        for text in recipients:
            try:
                extra.append(pyrage.x25519.Recipient.from_str(text))
            except Exception:
                raise ConfigError("not an age X25519 recipient: %r" % (text,)) from None
        self._recipients = [self._identity.to_public()] + extra
        #: Every recipient a copy is encrypted to, as text.
        self.recipients = [self.recipient] + [str(r) for r in extra]
        secret = secrets[0].encode("ascii")
        self._name_key = _hkdf(secret, _NAME_INFO)
        #: The key's id in records (says nothing about the key).
        self.key_id = _hkdf(secret, _KEY_ID_INFO, 16).hex()
        #: The ``age`` command used for large files, or None (pyrage only).
        self.binary = shutil.which("age") if age_binary == "auto" else age_binary

    def __repr__(self) -> str:
        return "<PoolKey %s (%d recipients)>" % (self.recipient, len(self.recipients))

    def object_name(self, file_hash: str) -> str:
        """The name a copy of ``file_hash`` has on every host (64 hex digits).

        >>> key = PoolKey.__new__(PoolKey); key._name_key = bytes(32)
        >>> len(key.object_name("0" * 64)), key.object_name("0" * 64) != "0" * 64
        (64, True)
        """
        return hmac.new(self._name_key, file_hash.encode("ascii"), hashlib.sha256).hexdigest()

    def encrypt(self, source: Any, destination: Any) -> None:
        """Encrypt ``source`` to every recipient into ``destination`` (anything
        with ``write``), streaming."""
        _pyrage().encrypt_io(source, destination, self._recipients)

    def decrypt(self, source: Any, destination: Any) -> None:
        """Decrypt ``source`` into ``destination``, streaming.

        Bytes may reach ``destination`` before a later chunk fails to
        authenticate: the caller writes into a temp file and keeps it only
        when this returns and the plaintext's hash matches.

        A failure of ``destination`` itself (a full disk, a limit of a
        :class:`~cloudmanager.fsutil.HashingWriter`) is raised as it is, kept
        in its ``error``: it says nothing of the ciphertext.

        :raises IntegrityError: if the ciphertext is not for this key, or a
            chunk fails to authenticate (a bad copy)
        """
        pyrage = _pyrage()
        try:
            pyrage.decrypt_io(source, destination, [self._identity])
        except Exception as exc:
            failed = getattr(destination, "error", None)
            if failed is not None:  # pyrage reports it as an OSError of its own
                raise failed from None
            if isinstance(exc, pyrage.DecryptError):
                raise IntegrityError("not decryptable with this pool's key: %s" % exc) from None
            if isinstance(exc, OSError):  # rage reports a chunk that fails to authenticate so
                raise IntegrityError("the ciphertext fails to authenticate: %s" % exc) from None
            raise

    def encrypt_file(self, source_path: str, destination_path: str) -> Tuple[str, int]:
        """Encrypt a file into a new private file; :return: the ciphertext's
        ``(sha256 hex, size)``, hashed as it is written (the source is read once).

        A large file is encrypted by the ``age`` command (see
        :data:`AGE_BINARY_MIN`), its output hashed here as it arrives; if
        that fails, by pyrage.

        :raises OSError: if the file cannot be read or written
        """
        with open(source_path, "rb") as src:
            size = os.fstat(src.fileno()).st_size
            if size <= SMALL_IN_MEMORY:
                return self._encrypt_small(src, size, destination_path)
        with open(source_path, "rb") as src, \
                open(destination_path, "xb") as raw:
            os.fchmod(raw.fileno(), 0o600)
            size = os.fstat(src.fileno()).st_size
            if self._use_binary(size):
                try:
                    return self._run_binary(self._encrypt_args(), src.fileno(), raw.fileno(),
                                            None, size)
                except (IntegrityError, OSError) as exc:
                    log.warning("the age command could not encrypt %s (%s); using pyrage",
                                source_path, exc)
                src.seek(0)
                raw.seek(0)
                raw.truncate()
            sink = HashingWriter(raw)
            self.encrypt(src, sink)
            raw.flush()
            return sink.digest.hexdigest(), sink.size

    def _encrypt_small(self, src: IO[bytes], size: int,
                       destination_path: str) -> Tuple[str, int]:
        """:meth:`encrypt_file` of a small file of ``size`` bytes, in memory:
        one read, one call into pyrage, one write (its stream wrappers cost
        more than the encryption of a few KiB: measured 157 against 96 us for
        4 KiB)."""
        data = src.read(size + 1)  # one byte more: a file that grew is seen
        if len(data) != size:
            raise OSError("%s changed size while it was read (%d bytes, not %d)"
                          % (getattr(src, "name", "the source"), len(data), size))
        sealed = _pyrage().encrypt(data, self._recipients)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) \
            | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(destination_path, flags, 0o600)
        try:
            fsutil.write_all(fd, sealed)
        finally:
            os.close(fd)
        return hashlib.sha256(sealed).hexdigest(), len(sealed)

    def decrypt_file(self, source_path: str, destination_path: str,
                     limit: Optional[int] = None, use_binary: bool = True) -> Tuple[str, int]:
        """Decrypt a file into ``destination_path`` (created private, or
        truncated); :return: the plaintext's ``(sha256 hex, size)``, hashed as
        it is written.

        A large file is decrypted by the ``age`` command (see
        :data:`AGE_BINARY_MIN`); a failure there is confirmed by pyrage
        before it condemns the copy (a broken or foreign ``age`` must not).

        :param limit: write at most this many bytes (the recorded size):
            more is refused before it can overfill a reservation
        :param use_binary: False to leave the ``age`` command out (to confirm
            what it made)
        :raises IntegrityError: see :meth:`decrypt`
        :raises OverflowError: past ``limit`` (the record or the copy is wrong)
        :raises OSError: if the destination cannot be written
        """
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(destination_path, flags, 0o600)
        with open(source_path, "rb") as src, os.fdopen(fd, "wb") as raw:
            if use_binary and self._use_binary(os.fstat(src.fileno()).st_size):
                try:
                    return self._run_binary(["--decrypt"], src.fileno(), raw.fileno(), limit,
                                            limit, identity=True)
                except (IntegrityError, OSError) as exc:
                    log.info("the age command could not decrypt %s (%s); trying pyrage",
                             source_path, exc)
                src.seek(0)
                raw.seek(0)
                raw.truncate()
            sink = HashingWriter(raw, limit, overflow=OverflowError)
            self.decrypt(src, sink)
            raw.flush()
            return sink.digest.hexdigest(), sink.size

    def decrypt_stream(self, source: Any, out_fd: int, limit: Optional[int] = None,
                       length: Optional[int] = None, use_binary: bool = True
                       ) -> Tuple[str, int]:
        """Decrypt ``source`` (a readable binary stream: a host's download),
        read once, into ``out_fd`` as it arrives; :return: the plaintext's
        ``(sha256 hex, size)``, hashed as it is written.

        The ciphertext is never stored. A large one (``length`` from
        :data:`AGE_BINARY_MIN` bytes) goes through the ``age`` command: this
        thread reads ``source`` into it while another hashes and writes what
        comes out. A smaller one is read whole and decrypted in memory by
        pyrage (as is a large one without the command, streaming).

        What ``source`` raises is raised as it is, never the decryption
        failure its cut-short ciphertext causes (a transfer that broke is not
        a bad copy); so is a failure to write ``out_fd``. Bytes may reach
        ``out_fd`` before a failure: the caller writes into a temp file.

        :param limit: write at most this many bytes (the recorded size)
        :param length: the ciphertext's expected size (chooses the way)
        :param use_binary: False to leave the ``age`` command out (to confirm
            what it refused or made)
        :raises IntegrityError: if the ciphertext is not for this key or fails
            to authenticate; :class:`~cloudmanager.errors.UnconfirmedIntegrityError`
            if the ``age`` command refused it or failed (the stream cannot be
            read again: the caller confirms with ``use_binary=False``)
        :raises OverflowError: if it decrypts to more than ``limit`` bytes
        :raises OSError: if ``out_fd`` cannot be written
        """
        if use_binary and self._use_binary(length):
            try:
                return self._run_binary_fed(["--decrypt"], source, out_fd, limit, limit,
                                            identity=True)
            except (IntegrityError, AgeCommandError) as exc:
                raise UnconfirmedIntegrityError("the age command could not decrypt it: %s"
                                                % exc) from None
        if length is not None and length <= AGE_BINARY_MIN:
            return self._decrypt_in_memory(source, out_fd, limit)
        src = _FirstError(source)
        with os.fdopen(out_fd, "wb", closefd=False) as raw:
            sink = HashingWriter(raw, limit, overflow=OverflowError)
            try:
                self.decrypt(src, sink)
            except IntegrityError:
                if src.error is not None:  # the source's failure, seen by pyrage
                    raise src.error from None
                raise
        return sink.digest.hexdigest(), sink.size

    def _decrypt_in_memory(self, source: Any, out_fd: int, limit: Optional[int]
                           ) -> Tuple[str, int]:
        """:meth:`decrypt_stream` of a small ciphertext: one read, one call into
        pyrage, one write."""
        pyrage = _pyrage()
        data = source.read()
        try:
            plain = pyrage.decrypt(data, [self._identity])
        except pyrage.DecryptError as exc:
            raise IntegrityError("not decryptable with this pool's key: %s" % exc) from None
        if limit is not None and len(plain) > limit:
            raise OverflowError("it decrypts to more than the %d bytes recorded" % limit)
        fsutil.write_all(out_fd, plain)
        return hashlib.sha256(plain).hexdigest(), len(plain)

    # -- the age command -----------------------------------------------------------

    def _use_binary(self, size: Optional[int]) -> bool:
        """Whether a file of ``size`` bytes goes through the ``age`` command."""
        return (self.binary is not None and size is not None and size >= AGE_BINARY_MIN
                and os.path.isdir("/dev/fd"))  # the identity goes through a descriptor

    def _encrypt_args(self) -> List[str]:
        """``age``'s arguments to encrypt to every recipient. Each recipient was
        parsed by pyrage (``age1`` and bech32), so none can be an option."""
        args = ["--encrypt"]
        for recipient in self.recipients:
            args += ["--recipient", recipient]
        return args

    def _run_binary(self, args: List[str], stdin_fd: int, out_fd: int, limit: Optional[int],
                    length: Optional[int], identity: bool = False) -> Tuple[str, int]:
        """Run ``age ARGS`` from ``stdin_fd`` into ``out_fd``, hashing its
        output here (:func:`~cloudmanager.fsutil.copy_and_hash`, pipelined
        for a large one) while it works on the other core.

        No path, name or other input is on its command line: it reads a
        descriptor and writes a pipe. The identity (``identity=True``) goes
        through a pipe of its own, passed as ``/dev/fd/N``: never in an
        argument, the environment or a file.

        :param limit: stop, kill it and raise past this many output bytes
        :param length: the output's expected size (chooses the copy's pipeline)
        :return: the output's ``(sha256 hex, size)``
        :raises IntegrityError: if it exits with an error (the input is not
            age for this key, or fails to authenticate)
        :raises OverflowError: past ``limit``
        :raises AgeCommandError: if it cannot run, or is killed
        :raises OSError: if ``out_fd`` cannot be written
        """
        proc = self._spawn(args, stdin_fd, identity)
        assert proc.stdout is not None and proc.stderr is not None
        try:
            digest, size = fsutil.copy_and_hash(proc.stdout, out_fd, limit=limit, length=length)
        except BaseException:
            proc.kill()
            raise
        finally:
            errors = _reap(proc)
        _check_exit(proc.returncode, errors)
        return digest, size

    def _run_binary_fed(self, args: List[str], source: Any, out_fd: int, limit: Optional[int],
                        length: Optional[int], identity: bool = False) -> Tuple[str, int]:
        """:meth:`_run_binary` with ``source`` (a stream, read to its end) as
        the command's input.

        This thread reads ``source`` into the command; a thread of its own
        hashes and writes what comes out, and kills the command if that
        fails (so that this side's next write fails too). Every wait is
        bounded by the command's end, never by the source: nothing else reads
        ``source``, and the caller may close it as soon as this returns.

        :raises: what ``source`` raises, as it is, before anything else; then
            what writing the output raised (OverflowError past ``limit``,
            OSError); then as :meth:`_run_binary` for the command's status
        """
        proc = self._spawn(args, subprocess.PIPE, identity)
        assert proc.stdin is not None and proc.stdout is not None
        stdout = proc.stdout
        out: Dict[str, Any] = {}

        def drain() -> None:
            try:
                out["result"] = fsutil.copy_and_hash(stdout, out_fd, limit=limit, length=length)
            except BaseException as exc:  # raised by the caller once the command ended
                out["error"] = exc
                proc.kill()

        drainer = threading.Thread(target=drain, daemon=True, name="cloudmanager-unseal")
        try:
            drainer.start()
            try:
                while True:
                    data = source.read(fsutil.CHUNK)
                    if not data:
                        break
                    fsutil.write_all(proc.stdin.fileno(), data)
            except BrokenPipeError:
                pass  # it stopped reading: its status, or the drainer's error, says why
            finally:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        except BaseException:
            proc.kill()
            raise
        finally:
            if drainer.ident is not None:
                drainer.join()  # bounded: the command has its input's end, or is killed
            errors = _reap(proc)
        if "error" in out:
            raise out["error"]
        _check_exit(proc.returncode, errors)
        return cast(Tuple[str, int], out["result"])

    def _spawn(self, args: List[str], stdin: Any, identity: bool) -> subprocess.Popen[bytes]:
        """Start ``age ARGS`` reading ``stdin``, its output and errors piped here
        (see :meth:`_run_binary` for the identity).

        :raises AgeCommandError: if it cannot run
        """
        assert self.binary is not None
        command = [self.binary] + args
        pass_fds: Tuple[int, ...] = ()
        key_fd = None
        try:
            if identity:
                key_fd, key_w = os.pipe()
                try:  # ~80 bytes: far within the pipe's buffer, so this never blocks
                    fsutil.write_all(key_w, ("%s\n" % self._identity).encode("ascii"))
                finally:
                    os.close(key_w)
                command += ["--identity", "/dev/fd/%d" % key_fd]
                pass_fds = (key_fd,)
            proc = subprocess.Popen(command, stdin=stdin, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, pass_fds=pass_fds, bufsize=0)
        except OSError as exc:
            raise AgeCommandError("cannot run the age command: %s" % exc) from None
        finally:
            if key_fd is not None:
                os.close(key_fd)
        for pipe in (proc.stdin, proc.stdout):
            try:
                if pipe is not None:
                    fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, _PIPE_SIZE)
            except OSError:
                pass  # not Linux, or a lower limit: smaller reads, same bytes
        return proc


class AgeCommandError(OSError):
    """The ``age`` command could not run, or was killed: it said nothing of its input."""


def _reap(proc: subprocess.Popen[bytes]) -> bytes:
    """Close the command's output, read its errors, wait for it; :return: its errors."""
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    errors = proc.stderr.read()  # a line or two: age says little
    proc.stderr.close()
    proc.wait()
    return errors


def _check_exit(code: int, errors: bytes) -> None:
    """Raise what the ``age`` command's exit status ``code`` says.

    :raises AgeCommandError: if it was killed
    :raises IntegrityError: if it failed (its input is not age for this key,
        or fails to authenticate)
    """
    if code < 0:
        raise AgeCommandError("the age command was killed (signal %d)" % -code)
    if code != 0:
        text = " ".join(errors.decode("utf-8", "replace").split())[:300]
        log.debug("age: %s", text)
        raise IntegrityError(text or "the age command failed (exit status %d)" % code)


class _FirstError:
    """A readable stream that keeps the first exception its reads raised
    (:attr:`error`), so that a broken transfer is told from the bad
    ciphertext its cut makes."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        #: The first exception a read raised, or None.
        self.error: Optional[BaseException] = None

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        try:
            data: bytes = self._raw.read(size)
        except BaseException as exc:
            if self.error is None:
                self.error = exc
            raise
        return data


class SealingStream:
    """A source's age ciphertext, made as it is read: a forward-only binary
    stream (``read``, ``readinto``) for a host's
    :meth:`~cloudmanager.hosts.base.Host.stage`, so that sealing a file
    needs no work file. The plaintext is hashed on the way (:attr:`source`).

    The encryption runs beside the reader, into a pipe it reads: the ``age``
    command fed by a thread (from :data:`AGE_BINARY_MIN` bytes, when
    installed), else pyrage in a thread. Every byte handed out may also be
    written to ``spool`` (a file the caller sends to more hosts: the same
    ciphertext for all). Close it (or use it as a context manager) to stop
    the work and reap the command, whether or not it was read to the end.

    :param key: the pool's key
    :param raw: the source, a binary file object at its first byte
    :param size: the source's size; more bytes are refused (OverflowError)
    :param spool: a new private file to write the ciphertext to as well, or None
    :param hashed: False for a source whose hash is known and trusted (a
        cached file, verified when it came in, as a plain upload sends it):
        it is not hashed again, and the ``age`` command reads its file
        descriptor itself (no feeder, one pass less over the bytes);
        :attr:`source` is then None
    """

    def __init__(self, key: PoolKey, raw: IO[bytes], size: int,
                 spool: Optional[str] = None, hashed: bool = True) -> None:
        #: The source as read: its SHA-256 (``hexdigest()``) and ``count``.
        self.source: Optional[fsutil.HashingReader] = \
            fsutil.HashingReader(raw, limit=size) if hashed else None
        self._raw = raw
        #: The file the ciphertext is written to as well, or None.
        self.spool_path = spool
        self._spool = None if spool is None else os.open(
            spool, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        self._error: Optional[BaseException] = None
        self._done = False
        self._proc: Optional[subprocess.Popen[bytes]] = None
        if key._use_binary(size):
            try:
                self._proc = subprocess.Popen([key.binary or "age"] + key._encrypt_args(),
                                              stdin=subprocess.PIPE if hashed else raw,
                                              stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, bufsize=0)
            except OSError as exc:  # gone since the key was loaded: pyrage does it
                log.warning("cannot run the age command (%s); using pyrage", exc)
        if self._proc is not None:
            assert self._proc.stdout is not None
            self._out: Any = self._proc.stdout
            for pipe in (self._proc.stdin, self._out):
                try:  # large pipes: fewer, larger reads and writes on each side
                    if pipe is not None:
                        fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, _PIPE_SIZE)
                except OSError:
                    pass
            target: Optional[Callable[[], None]] = self._feed if hashed else None
        else:
            read_end, self._write_end = os.pipe()
            self._out = os.fdopen(read_end, "rb", buffering=0)
            self._key = key
            target = self._pyrage
        self._thread = threading.Thread(target=target, name="cloudmanager-seal", daemon=True)
        self._thread.start()  # with no target (age reads the file), it ends at once

    def _feed(self) -> None:
        """The ``age`` command's feeder: the source, hashed, into its stdin."""
        assert self._proc is not None and self._proc.stdin is not None
        assert self.source is not None
        stdin = self._proc.stdin
        try:
            while True:
                data = self.source.read(fsutil.CHUNK)
                if not data:
                    break
                fsutil.write_all(stdin.fileno(), data)
        except BaseException as exc:  # the reader raises it at the end
            self._error = exc
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    def _pyrage(self) -> None:
        """pyrage's thread: the source, hashed, encrypted into the pipe."""
        try:
            with os.fdopen(self._write_end, "wb") as sink:
                self._key.encrypt(self.source if self.source is not None else self._raw, sink)
        except BaseException as exc:
            self._error = exc

    def readable(self) -> bool:
        """Always True: it is read."""
        return True

    def seekable(self) -> bool:
        """Always False: forward only (a reader buffers what it may resend)."""
        return False

    def readinto(self, buffer: Any) -> int:
        """Read ciphertext into ``buffer``; :return: how many bytes (0 at the end).

        :raises OSError: if the source could not be read or the encryption
            failed (at the end, instead of a short ciphertext); OverflowError
            if the source grew past its size
        """
        n = self._out.readinto(buffer) or 0
        if n:
            if self._spool is not None:
                fsutil.write_all(self._spool, memoryview(buffer)[:n])
            return n
        self._finish()
        return 0

    def read(self, size: Optional[int] = -1) -> bytes:
        """Up to ``size`` bytes of ciphertext (at most a chunk when negative)."""
        buffer = bytearray(fsutil.CHUNK if size is None or size < 0 else size)
        n = self.readinto(buffer)
        return bytes(buffer[:n])

    def _finish(self) -> None:
        """At the end of the ciphertext: the work is over; raise what failed."""
        if self._done:
            return
        self._done = True
        self._thread.join()
        if self._proc is not None:
            assert self._proc.stderr is not None
            errors = self._proc.stderr.read()
            code = self._proc.wait()
            if self._error is None and code != 0:
                text = " ".join(errors.decode("utf-8", "replace").split())[:300]
                self._error = OSError("the age command failed to encrypt (exit status %d): %s"
                                      % (code, text))
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop the work (if the ciphertext was not read to its end) and reap it."""
        if not self._done:
            self._done = True
            if self._proc is not None:
                self._proc.kill()
        self._out.close()  # a writer still at work gets EPIPE, and stops
        self._thread.join()
        if self._proc is not None:
            self._proc.wait()
            for pipe in (self._proc.stdin, self._proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        if self._spool is not None:
            os.close(self._spool)
            self._spool = None

    def __enter__(self) -> SealingStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def recipients_of(values: Iterable[str]) -> List[str]:
    """Check ``[pool] recipients`` entries; :return: them, stripped.

    :raises ConfigError: for one that is not an ``age1...`` recipient
    """
    found = []
    for value in values:
        text = str(value).strip()
        if not text.startswith("age1"):
            raise ConfigError("not an age X25519 recipient: %r" % (value,))
        found.append(text)
    return found


def key_from_settings(path: Optional[str], recipients: Sequence[str] = ()) -> Optional[PoolKey]:
    """The pool's :class:`PoolKey` for ``encryption_key`` / ``recipients``
    settings, or None when the pool has no key."""
    if not path:
        if recipients:
            raise ConfigError("recipients are given but no encryption_key")
        return None
    return PoolKey(os.path.expanduser(path), recipients_of(recipients))
