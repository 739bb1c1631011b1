"""The speed benchmark: `python scripts/bench.py [options]`, the same as `dnnlab bench [options]`.

See dnnlab/bench.py (or `python scripts/bench.py --help`) for what it measures and writes.
"""
import sys

from dnnlab.bench import main

if __name__ == "__main__":
    main(sys.argv[1:])
