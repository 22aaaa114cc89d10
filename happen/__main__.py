"""``python -m happen``: the ``happen`` command."""

from happen.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
