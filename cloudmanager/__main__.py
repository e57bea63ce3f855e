"""``python -m cloudmanager``: the same as the ``cm`` command."""

from .cli import main

main()
