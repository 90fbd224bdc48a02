"""``python -m benchmarks.study`` from a source checkout: the same as ``fsam-study``."""

from .cli import main

raise SystemExit(main())
