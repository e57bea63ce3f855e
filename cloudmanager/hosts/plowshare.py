"""File lockers through plowshare, via the plowshare-wrapper package.

Spec: ``plowshare:MODULE`` (for example ``plowshare:mediafire``). Uploads run
``plowup MODULE FILE``; downloads run ``plowdown URL -o DIR --temp-rename``.

plowshare-wrapper (PyPI ``plowshare``) is kept as the adapter:
:class:`PlowshareHost` drives a subclass of ``plowshare.plowshare.Plowshare``
and works around its defects where they bite:

- ``_run_command`` runs tools with no timeout and sends stderr to an unclosed
  ``/dev/null``; ours has a timeout that kills the whole process group, keeps
  the exit code (for error classes) and re-logs stderr at DEBUG;
- its ``parse_output`` takes the last whitespace-separated token of the
  output: for plowup, a delete link (``#DEL URL``) or an admin link
  (``#ADM URL``) when no download link follows. Ours takes only a bare
  download link; output with none is a failed upload;
- its download takes the last whitespace-separated token of plowdown's
  output as the file name, which breaks on names with spaces, and races
  several downloads of one file into one directory; we give each download a
  private directory and take the file from there, never a path printed by
  the tool that points elsewhere;
- plowdown cannot be told a size limit; we watch the bytes in its private
  directory while it runs and kill it past ``max_bytes``;
- its ``download``/``multiupload`` start a multiprocessing ``Manager`` on
  every call; the engine does the parallel work, so we never call them.

Safety: no shell; the URL is validated (scheme allowlist, never a leading
``-``) before it reaches ``plowdown``, since real plowdown has
``--run-after=PROGRAM``; the file handed to ``plowup`` is a symlink with a
plain name in a private directory, so a ``:`` or ``-`` in a user's path can
neither split into ``FILE:DESTNAME`` nor become an option.
"""

import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import (
    HostError,
    HostNotFoundError,
    HostUnavailableError,
    InvalidInputError,
    PermanentHostError,
    TransientHostError,
)
from ..validation import check_url, is_hash
from .base import Host, Location, PathLike, Received

log = logging.getLogger(__name__)

_MODULE = re.compile(r"[a-z0-9_]{1,64}")

# Plowshare 2 exit codes, grouped by what the engine should do about them.
_NOT_FOUND = {13}  # ERR_LINK_DEAD
_TRANSIENT = {3, 5, 6, 7, 8, 10}  # network, max wait, max tries, captcha, system, temp unavailable
# Everything else (1 fatal, 2 no module, 4 login, 11/12 password/permissions,
# 14 size limit, 15 bad command line) is permanent.

#: Default seconds for one plowup/plowdown run.
DEFAULT_TIMEOUT = 600.0
#: Seconds between two looks at a running plowdown's directory. At 100 MB/s
#: a download overshoots ``max_bytes`` by about 2 MB before it is killed.
WATCH_INTERVAL = 0.02


def default_modules() -> List[str]:
    """The plowshare-wrapper's default module list (anonymous upload hosts).

    :return: plowshare module names
    """
    from plowshare import hosts

    return list(hosts.anonymous)


def run_tool(argv: Sequence[str], timeout: float, cwd: Optional[str] = None,
             watch: Optional[Callable[[], None]] = None,
             interval: float = WATCH_INTERVAL) -> Tuple[Optional[int], bytes]:
    """Run an external tool without a shell; kill its process group on timeout.

    :param argv: the command and its arguments (never through a shell)
    :param timeout: seconds the tool may run
    :param cwd: the working directory (default: ours)
    :param watch: called every ``interval`` seconds while the tool runs; if
        it raises, the tool's process group is killed and the exception
        propagates
    :param interval: seconds between two calls of ``watch``
    :return: ``(returncode, stdout_bytes)``; returncode is None on timeout
    :raises OSError: if the tool cannot be started
    """
    proc = subprocess.Popen(
        argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise subprocess.TimeoutExpired(list(argv), timeout)
            try:
                # communicate() may be called again after a timeout: no
                # output is lost between the calls.
                out, err = proc.communicate(
                    timeout=remaining if watch is None else min(remaining, interval))
                break
            except subprocess.TimeoutExpired:
                if watch is not None:
                    watch()
    except subprocess.TimeoutExpired:
        out, err = _kill(proc)
        _log_stderr(argv[0], err)
        return None, out
    except BaseException:
        _, err = _kill(proc)
        _log_stderr(argv[0], err)
        raise
    _log_stderr(argv[0], err)
    return proc.returncode, out


def _kill(proc: "subprocess.Popen[bytes]") -> Tuple[bytes, bytes]:
    """Kill the tool's whole process group; return what it had written."""
    # Killing only the child would leave curl and friends holding the
    # pipes open (and writing), and communicate() would wait on them.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return proc.communicate()


def tree_bytes(directory: str) -> int:
    """Bytes in the regular files under ``directory`` (symlinks not followed).

    For a tool's private directory: a few entries, so a walk is cheap.

    :param directory: the directory to measure
    :return: the sum of the files' sizes; files that vanish meanwhile count 0
    """
    total = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:  # gone or unreadable: nothing we can count
        return 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                total += tree_bytes(entry.path)
            elif entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
        except OSError:  # renamed or removed by the tool meanwhile (.part → final)
            continue
    return total


def parse_plowup_output(output: bytes) -> Optional[str]:
    """The download link in plowup's output, or None if it printed none.

    plowup prints, for each file, its delete link as ``#DEL URL``, its admin
    link as ``#ADM URL`` and its download link as a bare URL. Lines that
    start with ``#`` are never taken: a delete link recorded as a copy
    would be handed to anyone who imports our records. Of the other lines,
    the last that is an http(s) URL is the download link.

    >>> parse_plowup_output(b"#DEL http://h/del/1\\nhttp://h/dl/1\\n")
    'http://h/dl/1'
    >>> parse_plowup_output(b"#DEL http://h/del/1\\n#ADM http://h/adm/1\\n") is None
    True

    :param output: plowup's standard output
    :return: the download URL, checked by :func:`~cloudmanager.validation.check_url`
    """
    links = []
    for line in output.decode("utf-8", "surrogateescape").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            links.append(check_url(line, schemes={"http", "https"}))
        except InvalidInputError:
            continue  # not a link (a message, or undecodable bytes)
    return links[-1] if links else None


def _log_stderr(tool: str, err: bytes) -> None:
    for line in err.decode("utf-8", "replace").splitlines():
        if line.strip():
            log.debug("%s: %s", tool, line)


def _wrapper_class() -> Any:
    """A plowshare-wrapper ``Plowshare`` subclass with a safe command runner."""
    from plowshare.plowshare import Plowshare

    class SafePlowshare(Plowshare):  # type: ignore[misc]  # the wrapper has no types
        def __init__(self, modules: List[str], timeout: float) -> None:
            super().__init__(modules)
            self.timeout = timeout

        def parse_output(self, hostname: str, output: bytes) -> Optional[str]:
            # The wrapper's takes the last token, a "#DEL" link's URL too.
            return parse_plowup_output(output)

        def _run_command(self, command: Sequence[str], **kwargs: Any) -> Dict[str, Any]:
            devnull = kwargs.get("stderr")
            if devnull is not None and hasattr(devnull, "close"):
                devnull.close()  # the wrapper opens one per call and never closes it
            try:
                code, out = run_tool(list(command), self.timeout, watch=kwargs.get("watch"))
            except OSError as exc:
                return {"error": "cannot run %s: %s" % (command[0], exc), "returncode": -1}
            if code == 0:
                return {"output": out}
            if code is None:
                return {"error": "timed out after %ss" % self.timeout, "returncode": None,
                        "output_on_error": out}
            return {"error": "%s exited with %d" % (command[0], code), "returncode": code,
                    "output_on_error": out}

    return SafePlowshare


_SafePlowshare: Any = None


class PlowshareHost(Host):
    """A file locker reached through plowshare's ``plowup``/``plowdown``.

    :param module: the plowshare module, e.g. ``"mediafire"``
    :param name: the host name recorded with uploads (default: the module)
    :param timeout: seconds one plowup or plowdown run may take
    :raises InvalidInputError: if ``module`` is not a plowshare module name
    """

    max_connections = 2

    def __init__(self, module: str, name: Optional[str] = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        global _SafePlowshare
        if not isinstance(module, str) or not _MODULE.fullmatch(module):
            raise InvalidInputError("not a plowshare module name: %r" % (module,))
        self.module = module
        self.name = name or module
        self.timeout = float(timeout)
        if _SafePlowshare is None:
            _SafePlowshare = _wrapper_class()
        self._plowshare = _SafePlowshare([module], self.timeout)

    @classmethod
    def from_spec(cls, scheme: str, target: str, **options: Any) -> "PlowshareHost":
        """Build from ``plowshare:MODULE``.

        :param scheme: ``"plowshare"``
        :param target: the module name
        :param options: keyword options of :class:`PlowshareHost`
        :return: a new :class:`PlowshareHost`
        :raises InvalidInputError: if the module name is not valid
        """
        return cls(target, **options)

    def _error(self, result: Dict[str, Any], what: str) -> HostError:
        code = result.get("returncode")
        message = "%s: %s" % (what, result.get("error"))
        if code is None:
            return HostUnavailableError(self.name, message)
        if code in _NOT_FOUND:
            return HostNotFoundError(self.name, message)
        if code in _TRANSIENT:
            return TransientHostError(self.name, message)
        return PermanentHostError(self.name, message)

    def accepts(self, url: object) -> bool:
        """plowdown picks its module from the URL, so any http(s) URL will do.

        :param url: any recorded URL
        :return: True for a URL that is safe to hand to plowdown
        """
        try:
            check_url(url, schemes={"http", "https"})
        except InvalidInputError:
            return False
        return True

    def upload(self, local_path: PathLike, name: str) -> Location:
        """Run ``plowup MODULE FILE`` and return the download link it prints.

        Delete (``#DEL``) and admin (``#ADM``) links are never taken for the
        copy: output without a download link is a failed upload.

        :param local_path: a readable local file
        :param name: the object's name, a SHA-256 hex digest (the name plowup
            sees, through a symlink in a private directory)
        :return: the :class:`Location` of the copy
        :raises InvalidInputError: if ``name`` is not a SHA-256 hex digest
        :raises TransientHostError: if plowup printed no download link
        :raises HostError: if plowup failed (classified by its exit code)
        """
        if not is_hash(name):  # also keeps ':' and '-' away from plowup's parser
            raise InvalidInputError("plowup objects are named by SHA-256, not %r" % (name,))
        staging = tempfile.mkdtemp(prefix="cm-plowup-")
        try:
            if ":" in staging or staging.startswith("-"):
                raise PermanentHostError(self.name, "temp dir %r is unsafe for plowup" % staging)
            link = os.path.join(staging, name)
            os.symlink(os.path.abspath(local_path), link)
            result = self._plowshare.upload_to_host(link, self.module)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if "error" in result:
            raise self._error(result, "plowup")
        url = result.get("url")
        if url is None:
            # The file may be up, but without its download link there is no
            # copy to record, and a delete or admin link must never pass for
            # one. Neither is shown: a delete link lets anyone delete.
            raise TransientHostError(self.name, "plowup exited 0 but printed no download link "
                                                "(delete and admin links are not copies)")
        return Location(self.name, url)

    def download(self, url: str, dest_path: PathLike,
                 max_bytes: Optional[int] = None) -> Optional[Received]:
        """Run ``plowdown URL -o DIR --temp-rename`` into a private directory.

        plowdown cannot be told a size limit, so the bytes in its private
        directory are measured every :data:`WATCH_INTERVAL` seconds while it
        runs; past ``max_bytes`` its process group is killed. At most one
        interval's worth of bytes lands beyond ``max_bytes``.

        :param url: an http(s) URL this host :meth:`accepts`
        :param dest_path: the destination file; replaced only on success
        :param max_bytes: the expected size; a larger object is refused and
            its download stopped
        :return: None: plowdown writes the file itself, so its bytes never
            pass through here to be hashed; the caller reads them once more
        :raises InvalidInputError: if ``url`` is not safe to hand to plowdown
        :raises TransientHostError: if the object is larger than
            ``max_bytes``, or plowdown left no single file
        :raises HostNotFoundError: if the link is dead
        :raises HostError: on any other failure (classified by exit code)
        """
        check_url(url, schemes={"http", "https"})  # never an option of plowdown
        dest_path = os.fspath(dest_path)
        workdir = tempfile.mkdtemp(prefix=os.path.basename(dest_path) + ".",
                                   dir=os.path.dirname(os.path.abspath(dest_path)))
        try:
            watch = None if max_bytes is None else self._size_watch(workdir, url, max_bytes)
            result = self._plowshare._run_command(
                ["plowdown", url, "-o", workdir, "--temp-rename"], watch=watch)
            if "error" in result:
                raise self._error(result, "plowdown")
            got = self._downloaded_file(workdir, result["output"])
            # A file that grew past the limit between two looks.
            if max_bytes is not None and os.path.getsize(got) > max_bytes:
                raise self._too_large(url, max_bytes)
            os.replace(got, dest_path)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        # plowdown wrote the file itself: no byte of it passed through this
        # process, so there is no digest to return, and the engine hashes the
        # file (the one download that reads its bytes twice).
        return None

    def _too_large(self, url: str, max_bytes: int) -> TransientHostError:
        # The same error as the other hosts' (Host.receive) for an object
        # larger than recorded.
        return TransientHostError(self.name, "%s is larger than the %d bytes expected"
                                  % (url, max_bytes))

    def _size_watch(self, workdir: str, url: str, max_bytes: int) -> Callable[[], None]:
        """A watch for :func:`run_tool` that raises once ``workdir`` holds too much."""
        def watch() -> None:
            if tree_bytes(workdir) > max_bytes:
                log.debug("%s: stopping plowdown of %s past %d bytes", self.name, url, max_bytes)
                raise self._too_large(url, max_bytes)

        return watch

    def _downloaded_file(self, workdir: str, output: bytes) -> str:
        """The one regular file plowdown left in ``workdir``.

        The printed path is used only when it names a regular file directly in
        ``workdir``; otherwise the directory's single finished file is taken.
        """
        lines = [ln for ln in output.decode("utf-8", "surrogateescape").splitlines() if ln.strip()]
        if lines:
            printed = os.path.join(workdir, lines[-1].strip())  # absolute stays absolute
            if os.path.dirname(os.path.realpath(printed)) == os.path.realpath(workdir) \
                    and os.path.isfile(printed) and not os.path.islink(printed):
                return printed
        files = [e.path for e in os.scandir(workdir)
                 if e.is_file(follow_symlinks=False) and not e.name.endswith(".part")]
        if len(files) == 1:
            return files[0]
        raise TransientHostError(
            self.name, "plowdown exited 0 but left %d files, not one" % len(files))
