"""Hosts: where copies of files live, one module per kind.

A *host spec* is a string that names a host:

- ``s3://BUCKET/PREFIX``: an S3-compatible object store through boto3
  (:mod:`cloudmanager.hosts.s3`; ``pip install 'cloudmanager[s3]'``);
- ``fsspec:URL``: any fsspec filesystem, e.g. ``fsspec:sftp://user@host/pool``
  (:mod:`cloudmanager.hosts.fsspec`; ``pip install 'cloudmanager[fsspec]'``);
- ``plowshare:MODULE``: a file locker through plowshare's ``plowup`` and
  ``plowdown`` (:mod:`cloudmanager.hosts.plowshare`);
- ``dir:/absolute/path`` or ``file:///absolute/path``: a local or mounted
  folder (:mod:`cloudmanager.hosts.folder`);
- ``memory:STORE``: objects in this process's memory, for tests and trials
  (:mod:`cloudmanager.hosts.memory`).

:func:`from_spec` turns a spec into a :class:`~cloudmanager.hosts.base.Host`.
Host modules are imported only when a spec needs them.
"""

import importlib
from typing import Any, Dict, Optional, Tuple, Type

from ..errors import InvalidInputError, MissingDependencyError
from .base import Host, Location, Received

#: scheme → (module, class name, the extra that installs its dependencies).
#: Imported lazily by :func:`host_class`.
REGISTRY: Dict[str, Tuple[str, str, Optional[str]]] = {
    "plowshare": ("cloudmanager.hosts.plowshare", "PlowshareHost", None),
    "dir": ("cloudmanager.hosts.folder", "FolderHost", None),
    "file": ("cloudmanager.hosts.folder", "FolderHost", None),
    "memory": ("cloudmanager.hosts.memory", "MemoryHost", None),
    "s3": ("cloudmanager.hosts.s3", "S3Host", "s3"),
    "fsspec": ("cloudmanager.hosts.fsspec", "FsspecHost", "fsspec"),
}

__all__ = ["Host", "Location", "REGISTRY", "Received", "from_spec", "host_class"]


def host_class(scheme: str) -> Type[Host]:
    """Return the Host class registered for ``scheme``, importing it on first use.

    :param scheme: a host kind, e.g. ``"dir"`` or ``"s3"``
    :return: the class of that kind of host

    :raises InvalidInputError: for an unknown scheme
    :raises MissingDependencyError: if the host kind's optional dependency
        is not installed; the message names the extra to install
    """
    try:
        module_name, class_name, extra = REGISTRY[scheme]
    except KeyError:
        raise InvalidInputError("unknown host kind %r (known: %s)"
                                % (scheme, ", ".join(sorted(REGISTRY)))) from None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if extra is None or exc.name == module_name:
            raise
        raise MissingDependencyError(
            "%s hosts need %s: pip install 'cloudmanager[%s]'" % (scheme, exc.name, extra)
        ) from exc
    cls: Type[Host] = getattr(module, class_name)
    return cls

def from_spec(spec: object, **options: Any) -> Host:
    """Build a host from its spec, e.g. ``"plowshare:mediafire"`` or ``"dir:/srv/pool"``.

    Host objects are passed through unchanged.

    :param spec: a spec string, or a :class:`Host` (returned as it is)
    :param options: keyword options for the host class (``name``, ``timeout``, ...)
    :return: the host
    :raises InvalidInputError: if the spec is malformed or its kind unknown
    """
    if isinstance(spec, Host):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise InvalidInputError("a host spec looks like 'kind:target', not %r" % (spec,))
    scheme, target = spec.split(":", 1)
    return host_class(scheme).from_spec(scheme, target, **options)
