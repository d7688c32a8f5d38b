"""``python -m worker``: the same as ``llava-worker``."""

from worker.cli import main

raise SystemExit(main())
