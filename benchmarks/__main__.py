"""``python -m benchmarks``: run every scenario and print the table."""

from benchmarks.run import main

raise SystemExit(main())
