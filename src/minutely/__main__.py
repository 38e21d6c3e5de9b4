"""``python -m minutely``: the ``minutely`` command line (:func:`minutely.cli.main`)."""

import sys

from minutely.cli import main

if __name__ == "__main__":
    sys.exit(main())
