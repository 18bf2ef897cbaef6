"""`python -m benchmarks.throughput [--quick]`: the steps are in the package docstring."""

import sys

from benchmarks.throughput.cli import main

if __name__ == "__main__":
    sys.exit(main())
