"""Hosts: where copies of files live, one module per kind.

A *host spec* is a string that names a host:

- ``plowshare:MODULE``: a file locker through plowshare's ``plowup`` and
  ``plowdown`` (:mod:`cloudmanager.hosts.plowshare`);
- ``dir:/absolute/path`` or ``file:///absolute/path``: a local or mounted
  folder (:mod:`cloudmanager.hosts.folder`).

:func:`from_spec` turns a spec into a :class:`~cloudmanager.hosts.base.Host`.
Host modules are imported only when a spec needs them.
"""

import importlib

from ..errors import InvalidInputError
from .base import Host, Location

#: scheme → (module, class name). Imported lazily by :func:`from_spec`.
REGISTRY = {
    "plowshare": ("cloudmanager.hosts.plowshare", "PlowshareHost"),
    "dir": ("cloudmanager.hosts.folder", "FolderHost"),
    "file": ("cloudmanager.hosts.folder", "FolderHost"),
}

__all__ = ["Host", "Location", "REGISTRY", "from_spec", "host_class"]


def host_class(scheme):
    """Return the Host class registered for ``scheme``, importing it on first use.

    :raises InvalidInputError: for an unknown scheme
    """
    try:
        module_name, class_name = REGISTRY[scheme]
    except KeyError:
        raise InvalidInputError("unknown host kind %r (known: %s)"
                                % (scheme, ", ".join(sorted(REGISTRY)))) from None
    return getattr(importlib.import_module(module_name), class_name)


def from_spec(spec, **options):
    """Build a host from its spec, e.g. ``"plowshare:mediafire"`` or ``"dir:/srv/pool"``.

    Host objects are passed through unchanged.

    :param options: keyword options for the host class (``name``, ``timeout``, ...)
    :raises InvalidInputError: if the spec is malformed or its kind unknown
    """
    if isinstance(spec, Host):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise InvalidInputError("a host spec looks like 'kind:target', not %r" % (spec,))
    scheme, target = spec.split(":", 1)
    return host_class(scheme).from_spec(scheme, target, **options)
