"""Run every benchmark script in turn (`make bench`); each prints its own JSON line and table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = ["dde_weights.py", "throughput.py"]

if __name__ == "__main__":
    failed = [s for s in SCRIPTS if subprocess.run([sys.executable, str(HERE / s), *sys.argv[1:2]]).returncode]
    sys.exit(f"failed: {', '.join(failed)}" if failed else 0)
