"""File lockers through plowshare, via the plowshare-wrapper package.

Spec: ``plowshare:MODULE`` (for example ``plowshare:mediafire``). Uploads run
``plowup MODULE FILE``; downloads run ``plowdown URL -o DIR --temp-rename``.

plowshare-wrapper (PyPI ``plowshare``) is kept as the adapter:
:class:`PlowshareHost` drives a subclass of ``plowshare.plowshare.Plowshare``
and works around its defects where they bite:

- ``_run_command`` runs tools with no timeout and sends stderr to an unclosed
  ``/dev/null``; ours has a timeout that kills the whole process group, keeps
  the exit code (for error classes) and re-logs stderr at DEBUG;
- its download takes the last whitespace-separated token of plowdown's
  output as the file name, which breaks on names with spaces, and races
  several downloads of one file into one directory; we give each download a
  private directory and take the file from there, never a path printed by
  the tool that points elsewhere;
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

from ..errors import (
    HostNotFoundError,
    HostUnavailableError,
    InvalidInputError,
    PermanentHostError,
    TransientHostError,
)
from ..validation import check_url, is_hash
from .base import Host, Location

log = logging.getLogger(__name__)

_MODULE = re.compile(r"[a-z0-9_]{1,64}")

# Plowshare 2 exit codes, grouped by what the engine should do about them.
_NOT_FOUND = {13}  # ERR_LINK_DEAD
_TRANSIENT = {3, 5, 6, 7, 8, 10}  # network, max wait, max tries, captcha, system, temp unavailable
# Everything else (1 fatal, 2 no module, 4 login, 11/12 password/permissions,
# 14 size limit, 15 bad command line) is permanent.

#: Default seconds for one plowup/plowdown run.
DEFAULT_TIMEOUT = 600.0


def default_modules():
    """The plowshare-wrapper's default module list (anonymous upload hosts)."""
    from plowshare import hosts

    return list(hosts.anonymous)


def run_tool(argv, timeout, cwd=None):
    """Run an external tool without a shell; kill its process group on timeout.

    :return: ``(returncode, stdout_bytes)``; returncode is None on timeout
    """
    proc = subprocess.Popen(
        argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Killing only the child would leave curl and friends holding the
        # pipes open, and communicate() would wait on them.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        _log_stderr(argv[0], err)
        return None, out
    _log_stderr(argv[0], err)
    return proc.returncode, out


def _log_stderr(tool, err):
    for line in err.decode("utf-8", "replace").splitlines():
        if line.strip():
            log.debug("%s: %s", tool, line)


def _wrapper_class():
    """A plowshare-wrapper ``Plowshare`` subclass with a safe command runner."""
    from plowshare.plowshare import Plowshare

    class SafePlowshare(Plowshare):
        def __init__(self, modules, timeout):
            super().__init__(modules)
            self.timeout = timeout

        def _run_command(self, command, **kwargs):
            devnull = kwargs.get("stderr")
            if devnull is not None and hasattr(devnull, "close"):
                devnull.close()  # the wrapper opens one per call and never closes it
            try:
                code, out = run_tool(list(command), self.timeout)
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


_SafePlowshare = None


class PlowshareHost(Host):
    """A file locker reached through plowshare's ``plowup``/``plowdown``.

    :param module: the plowshare module, e.g. ``"mediafire"``
    :param name: the host name recorded with uploads (default: the module)
    :param timeout: seconds one plowup or plowdown run may take
    """

    max_connections = 2

    def __init__(self, module, name=None, timeout=DEFAULT_TIMEOUT):
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
    def from_spec(cls, scheme, target, **options):
        """Build from ``plowshare:MODULE``."""
        return cls(target, **options)

    def _error(self, result, what):
        code = result.get("returncode")
        message = "%s: %s" % (what, result.get("error"))
        if code is None:
            return HostUnavailableError(self.name, message)
        if code in _NOT_FOUND:
            return HostNotFoundError(self.name, message)
        if code in _TRANSIENT:
            return TransientHostError(self.name, message)
        return PermanentHostError(self.name, message)

    def accepts(self, url):
        """plowdown picks its module from the URL, so any http(s) URL will do."""
        try:
            check_url(url, schemes={"http", "https"})
        except InvalidInputError:
            return False
        return True

    def upload(self, local_path, name):
        """Run ``plowup MODULE FILE`` and return the URL it prints last."""
        if not is_hash(name):  # also keeps ':' and '-' away from plowup's parser
            raise InvalidInputError("plowup objects are named by SHA-256, not %r" % (name,))
        staging = tempfile.mkdtemp(prefix="cm-plowup-")
        try:
            if ":" in staging or staging.startswith("-"):
                raise PermanentHostError(self.name, "temp dir %r is unsafe for plowup" % staging)
            link = os.path.join(staging, name)
            os.symlink(os.path.abspath(local_path), link)
            try:
                result = self._plowshare.upload_to_host(link, self.module)
            except (UnicodeDecodeError, IndexError) as exc:
                # The wrapper decodes strictly and takes the last token: bytes
                # that are not UTF-8, or no output at all, end up here.
                raise TransientHostError(self.name, "plowup printed no usable URL (%s)"
                                         % type(exc).__name__) from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if "error" in result:
            raise self._error(result, "plowup")
        try:
            url = check_url(result.get("url"), schemes={"http", "https"})
        except (InvalidInputError, IndexError) as exc:
            raise TransientHostError(self.name, "plowup printed no usable URL: %s" % exc) from exc
        return Location(self.name, url)

    def download(self, url, dest_path, max_bytes=None):
        """Run ``plowdown URL -o DIR --temp-rename`` into a private directory.

        plowdown cannot be told a size limit; a file larger than ``max_bytes``
        is refused once it has arrived.
        """
        check_url(url, schemes={"http", "https"})  # never an option of plowdown
        workdir = tempfile.mkdtemp(prefix=os.path.basename(dest_path) + ".",
                                   dir=os.path.dirname(os.path.abspath(dest_path)))
        try:
            result = self._plowshare._run_command(
                ["plowdown", url, "-o", workdir, "--temp-rename"])
            if "error" in result:
                raise self._error(result, "plowdown")
            got = self._downloaded_file(workdir, result["output"])
            if max_bytes is not None and os.path.getsize(got) > max_bytes:
                raise TransientHostError(self.name, "%s is larger than the %d bytes expected"
                                         % (url, max_bytes))
            os.replace(got, dest_path)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _downloaded_file(self, workdir, output):
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

