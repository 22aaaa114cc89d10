"""The ``happen`` command line: ``happen --help`` lists its commands.

Installed as the ``happen`` script; also ``python -m happen``. See ``docs/operating.md``.
"""

from happen.cli._main import main

__all__ = ["main"]
