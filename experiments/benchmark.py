"""`python -m experiments.benchmark` (the docs/api.md spelling) runs the decode benchmark, benchmarks/benchmark.py.

Every benchmark lives in benchmarks/ (``python -m benchmarks.benchmark`` is the same command);
this module only keeps the documented command working.
"""

import sys

from benchmarks.benchmark import main

if __name__ == "__main__":
    main(sys.argv[1:])
