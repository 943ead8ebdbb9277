"""The ``lighten`` command line: one module per subcommand, wired together in :mod:`.main`.

Subcommand modules import only argparse at module level, so ``lighten --help`` stays fast; torch,
ONNX Runtime and matplotlib are imported when a command actually runs.
"""

from lighten.cli.main import main

__all__ = ["main"]
