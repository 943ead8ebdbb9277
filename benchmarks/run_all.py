"""Run every benchmark in turn (`make bench`). Each writes its table under benchmarks/results/."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
BENCHMARKS = ["backend_latency.py", "demo_stages.py", "recipes_table.py"]

if __name__ == "__main__":
    for script in BENCHMARKS:
        print(f"== {script}", flush=True)
        subprocess.run([sys.executable, str(HERE / script)], check=True)
