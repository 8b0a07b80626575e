"""Run every benchmark in this folder, one subprocess each (so XLA and torch thread pools
do not interfere across benchmarks). ``python bench/run_all.py [--small]``."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
BENCHES = ["bench_models.py", "bench_decode.py", "bench_products.py", "bench_stream.py", "bench_swift.py", "bench_genarm.py"]


def main() -> int:
    extra = sys.argv[1:]
    rc = 0
    for name in BENCHES:
        path = HERE / name
        if not path.exists():
            continue
        print(f"\n##### {name}", flush=True)
        rc |= subprocess.call([sys.executable, str(path), *extra])
    return rc


if __name__ == "__main__":
    sys.exit(main())
