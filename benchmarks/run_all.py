"""Run every benchmark in turn (`make bench`). Each writes its table under benchmarks/results/.

The commands are the ones quoted in the README; prune_peers.py fine-tunes ResNet-20 seven times
(2 epochs) and MobileNetV2 four times (1 epoch), prune_quant.py ResNet-20 once more: about an
hour and a half on 2 cores.
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
    ["prune_peers.py", "--epochs", "2", "--models", "resnet20"],
    ["prune_peers.py", "--epochs", "1", "--models", "mobilenetv2", "--methods", "2", "4", "5", "6",
     "--name", "prune_peers_mobilenetv2"],
    ["prune_quant.py", "--epochs", "2", "--threads", "2"],
    ["importance.py", "--models", "resnet20", "mobilenetv2", "--epochs", "1"],
]

if __name__ == "__main__":
    for script, *args in BENCHMARKS:
        print(f"== {script} {' '.join(args)}", flush=True)
        subprocess.run([sys.executable, str(HERE / script), *args], check=True)
