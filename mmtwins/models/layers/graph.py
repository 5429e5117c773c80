"""Whether a graph is being recorded, which the layers' shape-dependent and CPU-only paths ask."""
import torch


def is_exporting() -> bool:
    """True while a graph is being recorded for export.

    That is ``torch.jit.trace`` (under the TorchScript-based ``torch.onnx.export(dynamo=False)``)
    or ``torch.export`` (under ``torch.onnx.export(dynamo=True)``). Shape-dependent branches must
    then take the path that is valid for every input size instead of the one the example takes.
    """
    return torch.jit.is_tracing() or torch.compiler.is_exporting()
