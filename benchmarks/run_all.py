"""Run every benchmark in turn (`make bench`), each writing benchmarks/results/<name>.json.

They are timing measurements: run them on an otherwise idle machine. Not part of `make test`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    "bench_losses.py",
    "bench_quantizer.py",
    "bench_fsq.py",
    "bench_iw_nll.py",
    "bench_train_throughput.py",
    "bench_threads.py",
    "bench_kl_decomposition.py",
]


def main() -> None:
    for script in SCRIPTS:
        print(f"== {script}", flush=True)
        subprocess.run([sys.executable, str(HERE / script)], check=True)


if __name__ == "__main__":
    main()
