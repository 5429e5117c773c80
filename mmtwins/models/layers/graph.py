"""Whether a graph is being recorded, which the layers' shape-dependent and CPU-only paths ask."""
import torch


def is_exporting() -> bool:
    """True while a graph is being recorded for export.

    That is ``torch.jit.trace`` (under the TorchScript-based ``torch.onnx.export(dynamo=False)``)
    or ``torch.export`` (under ``torch.onnx.export(dynamo=True)``). Shape-dependent branches must
    then take the path that is valid for every input size instead of the one the example takes.
    """
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def is_recording() -> bool:
    """True while a graph is being recorded, for export (:func:`is_exporting`) or by
    ``torch.compile``: the eager-only CPU routes (oneDNN linears, the compiled kernels) step
    aside, so the graph keeps PyTorch's own operators."""
    return is_exporting() or torch.compiler.is_compiling()
