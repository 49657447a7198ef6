"""``python -m ctxagg ...`` runs the ``ctxagg`` command (see :mod:`ctxagg.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
