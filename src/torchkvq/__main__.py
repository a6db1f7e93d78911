"""``python -m torchkvq eval ...``: the same as the ``torchkvq`` console script."""

from .cli import main

raise SystemExit(main())
