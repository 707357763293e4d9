"""``python -m momentprop``: the command line of :mod:`momentprop.cli`."""

from .cli import main

raise SystemExit(main())
