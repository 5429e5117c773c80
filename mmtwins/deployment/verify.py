"""Check an exported graph: ONNX Runtime (CPU) against PyTorch, and its operator domains."""
import importlib.util
from typing import Dict, List, Sequence, Set

import numpy as np
import torch

from .export import INPUT_NAME
from .wrappers import ExportModule

DEFAULT_DOMAINS = ('', 'ai.onnx')


def require_checkers(runtime: bool) -> None:
    """Stop before an export, with the command that installs them, when the packages that check
    the graph are missing: ``onnx`` (the operator scan) and, with ``runtime``, ``onnxruntime``.

    Raises:
        SystemExit: naming the missing packages.
    """
    wanted = ('onnx', 'onnxruntime') if runtime else ('onnx', )
    missing = [name for name in wanted if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f'{" and ".join(missing)} not installed, needed to check the exported '
                         f'graph: pip install -e .[deploy] (or: pip install {" ".join(missing)})')


def non_default_domain_ops(path: str) -> Set[str]:
    """``'domain::op'`` of every node outside the default ONNX domain (empty for a clean graph;
    custom-domain ops need a plugin in ONNX Runtime and TensorRT)."""
    import onnx
    graph = onnx.load(path).graph
    nodes = list(graph.node)
    found = set()
    while nodes:
        node = nodes.pop()
        if node.domain not in DEFAULT_DOMAINS:
            found.add(f'{node.domain}::{node.op_type}')
        for attr in node.attribute:  # the bodies of If/Loop/Scan
            nodes.extend(n for g in (*attr.graphs, attr.g) for n in g.node)
    return found


def verify_onnx(path: str, module: ExportModule, sizes: Sequence[Sequence[int]],
                seed: int = 0, verbose: bool = False) -> List[Dict]:
    """Run ``path`` in ONNX Runtime (CPU) and ``module`` in PyTorch on the same random images.

    Args:
        path (str): The ``.onnx`` file.
        module (ExportModule): The module that was exported.
        sizes (Sequence[Sequence[int]]): ``(B, H, W)`` of each input to try.
        seed (int): Seed of the random images.
        verbose (bool): Print a line before each size (each takes a while on a CPU).

    Returns:
        list[dict]: Per size: ``size``; ``outputs`` mapping each output name to its shape and
        ``max_abs_diff`` (float outputs) or ``mismatches`` (integer outputs: differing labels).

    Raises:
        ValueError: an output's shape differs between the two.
    """
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    names = [o.name for o in session.get_outputs()]
    gen = torch.Generator().manual_seed(seed)
    module = module.eval()
    results = []
    for b, h, w in sizes:
        if verbose:
            print(f'running ONNX Runtime and PyTorch on {b}x{module.in_channels}x{h}x{w} ...',
                  flush=True)
        images = torch.randn(b, module.in_channels, h, w, generator=gen)
        with torch.no_grad():
            expected = [t.numpy() for t in module(images)]
        got = session.run(names, {INPUT_NAME: images.numpy()})
        outputs = {}
        for name, ref, out in zip(names, expected, got):
            if ref.shape != out.shape:
                raise ValueError(f'{name} at {(b, h, w)}: ONNX Runtime gives shape {out.shape}, '
                                 f'PyTorch {ref.shape}')
            if np.issubdtype(ref.dtype, np.floating):
                diff = float(np.abs(ref - out).max()) if ref.size else 0.
                outputs[name] = dict(shape=ref.shape, max_abs_diff=diff)
            else:
                outputs[name] = dict(shape=ref.shape, mismatches=int((ref != out).sum()))
        results.append(dict(size=(b, h, w), outputs=outputs))
    return results
