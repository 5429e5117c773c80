"""Test helpers that look inside a run: the aten operators it dispatches, the analysis tools
loaded as modules so their ``main(argv)`` runs in the test's process, and the weight decay an
optimiser gives each parameter."""
import importlib.util
from collections import Counter
from pathlib import Path
from typing import Set, Tuple

from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mmtwins.models.layers import PositionEncodingGenerator

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


def weight_decay_split(model: nn.Module, wrapper) -> Tuple[Set[str], Set[str]]:
    """(names without weight decay, names with the optimiser's) of ``model``'s parameters, read
    from the param groups of ``wrapper``'s optimiser; every parameter must be in one of them."""
    name = {id(p): n for n, p in model.named_parameters()}
    decay = wrapper.optimizer.defaults['weight_decay']
    exempt, decayed = set(), set()
    for group in wrapper.optimizer.param_groups:
        assert group['weight_decay'] in (0, decay), group['weight_decay']
        (exempt if group['weight_decay'] == 0 else decayed).update(
            name[id(p)] for p in group['params'])
    assert exempt | decayed == set(name.values())
    return exempt, decayed


def norm_and_peg_params(model: nn.Module) -> Set[str]:
    """Names of the parameters of every LayerNorm and PEG in ``model``, found by module type:
    what the Swin-setting recipes exempt from weight decay."""
    return {f'{mod_name}.{p}' for mod_name, mod in model.named_modules()
            if isinstance(mod, (nn.LayerNorm, PositionEncodingGenerator))
            for p, _ in mod.named_parameters()}
