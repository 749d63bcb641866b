"""``python -m capsule_nb``: the ``capsule-nb`` command (``cli.py``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
