"""``python -m benchmarks`` from a source checkout: the same as ``fsam-bench``."""

from .cli import main

raise SystemExit(main())
