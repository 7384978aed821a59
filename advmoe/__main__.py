"""``python -m advmoe ...`` (and ``torchrun -m advmoe ...``): the ``advmoe`` command line."""

import sys

from advmoe.cli import main

if __name__ == "__main__":
    sys.exit(main())
