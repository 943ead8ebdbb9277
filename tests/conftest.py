"""Shared test setup."""

import importlib.util

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models on a shared CPU run faster single-threaded than fighting for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_models_module(directory, name: str, source: str):
    """Write ``source`` as ``directory/name.py`` and import it: (path, module), the way a user's
    ``python: file.py:factory`` model file is both a recipe path and importable code."""
    path = directory / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module
