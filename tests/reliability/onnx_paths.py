"""ONNX files whose external data points outside their folder: ``..``, an absolute path, a
symlink, a path that climbs out through a subfolder. Each names a real 16-byte file outside."""

from __future__ import annotations

import os
from pathlib import Path

LOCATIONS = {"parent": "../secret.bin", "absolute": None, "symlink": "link.bin",
             "climb": "sub/../../secret.bin"}


def build_corpus(folder: str | Path) -> list[tuple[str, Path]]:
    import numpy as np
    from onnx import TensorProto, helper

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    secret = folder / "secret.bin"
    np.ones(4, dtype=np.float32).tofile(secret)
    cases = []
    for name, location in LOCATIONS.items():
        model_dir = folder / name
        model_dir.mkdir(parents=True, exist_ok=True)
        if name == "symlink":
            os.symlink(secret, model_dir / "link.bin")
        w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4],
                        data_location=TensorProto.EXTERNAL)
        for key, value in (("location", location or str(secret)), ("length", "16")):
            entry = w.external_data.add()
            entry.key, entry.value = key, value
        graph = helper.make_graph(
            [helper.make_node("Add", ["x", "w"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], initializer=[w])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        path = model_dir / "model.onnx"
        path.write_bytes(model.SerializeToString())
        cases.append((name, path))
    return cases
