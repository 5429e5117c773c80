"""Export Twins models to ONNX and check the graphs with ONNX Runtime.

:func:`build_export_module` turns a built model (a bare backbone, an mmseg segmentor or an mmdet
detector) into a module whose ``forward(images)`` returns a flat tuple of tensors;
:func:`export_onnx` exports it with dynamic batch, height and width; :func:`verify_onnx` runs the
file in ONNX Runtime against PyTorch and :func:`non_default_domain_ops` lists any operator outside
the default ONNX domain. ``tools/deployment/pytorch2onnx.py`` wraps all of them.
"""
from .export import export_onnx
from .verify import non_default_domain_ops, verify_onnx
from .wrappers import ExportModule, build_export_module, load_model

__all__ = [
    'ExportModule', 'build_export_module', 'export_onnx', 'load_model',
    'non_default_domain_ops', 'verify_onnx'
]
