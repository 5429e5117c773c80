"""Test helpers that look inside a run: the aten operators it dispatches, and the analysis tools
loaded as modules so their ``main(argv)`` runs in the test's process."""
import importlib.util
from collections import Counter
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

ANALYSIS_TOOLS = Path(__file__).resolve().parents[1] / 'tools' / 'analysis_tools'


class CountOps(TorchDispatchMode):
    """The aten operators run inside ``with``, by name (``ops``)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def analysis_tool(name: str):
    """``tools/analysis_tools/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(name, ANALYSIS_TOOLS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
