"""Run every benchmark in turn (`make bench`). Each writes its table under benchmarks/results/.

The commands are the ones quoted in the README; prune_peers.py fine-tunes ResNet-20 and
MobileNetV2 five times each and prune_quant.py once more (together about an hour on 2 cores).
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
    ["calibration.py", "--models", "lenet5", "resnet20"],
    ["prune_peers.py", "--epochs", "2", "--models", "resnet20", "mobilenetv2"],
    ["prune_quant.py", "--epochs", "2", "--threads", "2"],
]

if __name__ == "__main__":
    for script, *args in BENCHMARKS:
        print(f"== {script} {' '.join(args)}", flush=True)
        subprocess.run([sys.executable, str(HERE / script), *args], check=True)
