"""``python -m minutely.serve``: see :mod:`minutely.serve.cli`."""

import sys

from minutely.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
