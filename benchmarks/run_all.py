"""Run every benchmark in turn (`make bench`). Each writes its table under benchmarks/results/.

The commands are the ones quoted in the README; prune_peers.py fine-tunes ResNet-20 four times
(about 20 minutes on 2 cores).
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
BENCHMARKS = [
    ["backend_latency.py", "--backends", "onnxruntime", "openvino", "torch"],
    ["demo_stages.py"],
    ["recipes_table.py", "--quiet"],
    ["quant_peers.py", "--models", "lenet5", "lenet300", "resnet20", "--runs", "50"],
    ["prune_peers.py", "--epochs", "2", "--models", "resnet20"],
]

if __name__ == "__main__":
    for script, *args in BENCHMARKS:
        print(f"== {script} {' '.join(args)}", flush=True)
        subprocess.run([sys.executable, str(HERE / script), *args], check=True)
