"""``python -m producer``: the ``llava-queue`` command line."""

from producer.cli import main

raise SystemExit(main())
