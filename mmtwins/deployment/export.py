"""ONNX export with dynamic batch, height and width from one example input.

The export uses torch's TorchScript-based exporter (``torch.onnx.export(dynamo=False,
dynamic_axes=...)``), deprecated since torch 2.9 but still shipped in 2.13. It traces every size
read from a tensor as a graph value, so window and patch padding, window counts and the LSA key
mask become ``Shape``/``Mod``/``Pad``/``Range`` arithmetic; the one trap, Python branches on a
size being frozen at the example's value, is closed by the backbone taking its padded path
whenever it is exported (:func:`mmtwins.models.layers.graph.is_exporting`).

The torch.export-based exporter (``dynamo=True``, torch's default) was tried on the same code
with torch 2.13 and ``dynamic_shapes``: on a 4-stage tiny SVT it took over two minutes and
returned a graph whose height and width were fixed to the example's, and
``torch.export.export(strict=False)`` alone did not finish in 15 minutes. It is not offered.
"""
import warnings
from typing import List, Sequence

import torch

from .wrappers import ExportModule

INPUT_NAME = 'images'


def export_onnx(module: ExportModule, path: str, shape: Sequence[int], batch: int = 1,
                dynamic: bool = True, opset: int = 17) -> List[str]:
    """Export ``module`` to the ONNX file ``path`` (weights inside the file).

    Args:
        module (ExportModule): From :func:`build_export_module`.
        path (str): Output ``.onnx`` file.
        shape (Sequence[int]): Example ``(H, W)``. With ``dynamic`` the graph accepts any size
            of at least ``module.min_input_size`` (the graph itself does not check it); without,
            exactly this one.
        batch (int): Example batch size (with ``dynamic`` any batch size works).
        dynamic (bool): Dynamic batch, height and width (``dynamic_axes`` named ``batch``,
            ``height``, ``width`` on the input, and ``batch``, ``<name>_height``,
            ``<name>_width`` on its last two dims on every output ``<name>``).
        opset (int): ONNX opset (17 has ``LayerNormalization``).

    Returns:
        list[str]: The graph's output names, in order.
    """
    h, w = shape
    if min(h, w) < module.min_input_size:
        raise ValueError(f'shape {h}x{w} is too small: the backbone needs at least '
                         f'{module.min_input_size} pixels per side')
    module = module.eval()
    example = torch.randn(batch, module.in_channels, h, w)
    shapes = module.output_shapes(example)
    names = list(shapes)
    axes = None
    if dynamic:
        axes = {INPUT_NAME: {0: 'batch', 2: 'height', 3: 'width'}}
        # Each output's map sizes get names of their own: one name shared by all would declare
        # them equal, which the levels of a feature pyramid are not.
        axes.update({name: {0: 'batch', len(s) - 2: f'{name}_height', len(s) - 1: f'{name}_width'}
                     for name, s in shapes.items()})
    with torch.no_grad(), warnings.catch_warnings():
        # The exporter is chosen deliberately (module docstring): silence its deprecation notice.
        warnings.filterwarnings('ignore', 'You are using the legacy TorchScript-based ONNX',
                                DeprecationWarning)
        torch.onnx.export(module, (example, ), path, dynamo=False, input_names=[INPUT_NAME],
                          output_names=names, dynamic_axes=axes, opset_version=opset)
    return names
