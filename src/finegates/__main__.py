"""`python -m finegates ...`: the same command line as `finegates ...`."""

import sys

from finegates.cli import main

if __name__ == "__main__":
    sys.exit(main())
