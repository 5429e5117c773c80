"""Parameters and FLOPs (multiply-accumulates) of a model, attention matmuls included.

MMEngine's :class:`~mmengine.analysis.FlopAnalyzer` (a port of fvcore's) traces the model and counts
convolutions, linear layers, matmuls and norms, but it has no handle for
``aten::scaled_dot_product_attention``: a model that runs its attention through
``F.scaled_dot_product_attention`` (every mmtwins attention does) would silently lose the two
attention matmuls. :func:`sdpa_flop_jit` counts them and :func:`count_complexity` registers it.

Convention (the one that reproduces the Twins paper's Table 1 within 1.5 %, see the README): one
multiply-accumulate is one FLOP; convolutions, linear layers and both attention matmuls
(``q @ k^T`` and ``attn @ v``) are counted; norms, pooling and bilinear/nearest upsampling are
counted by MMEngine's estimates (a few multiples of their element count); activations, softmax
and residual additions are not.
"""
from collections import Counter
from dataclasses import dataclass, field
from math import prod
from typing import Any, List, Tuple, Union

import torch
from mmengine.analysis import FlopAnalyzer, parameter_count
from mmengine.analysis.print_helper import complexity_stats_table
from mmengine.analysis.jit_handles import get_shape
from torch import nn

SDPA_OP = 'aten::scaled_dot_product_attention'


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Multiply-accumulates of ``aten::scaled_dot_product_attention`` from its traced shapes.

    ``query`` (..., L, E), ``key`` (..., S, E) and ``value`` (..., S, Ev) give
    ``batch * L * S * E`` for ``query @ key^T`` plus ``batch * L * S * Ev`` for
    ``attn @ value``, where ``batch`` is the product of the output's leading dimensions (the
    query heads: with grouped-query attention keys and values have fewer).
    The mask, dropout, scaling and softmax are element-wise and not counted.
    """
    q, k, v, out = (get_shape(x) for x in (*inputs[:3], outputs[0]))
    if q is None or k is None or v is None or out is None:
        raise ValueError('scaled_dot_product_attention was traced with tensors of unknown shape; '
                         'trace the model with concrete input tensors')
    batch = prod(out[:-2])
    length, source = q[-2], k[-2]
    return batch * length * source * (q[-1] + v[-1])


@dataclass
class Complexity:
    """What :func:`count_complexity` measured.

    Attributes:
        flops: multiply-accumulates of one forward pass of the given inputs.
        attention_flops: the part of ``flops`` spent in the attention matmuls.
        params: number of parameters of the model.
        by_operator: ``flops`` split by (simplified) operator name.
        uncounted_ops: operators the trace met that have no handle (element-wise ops,
            activations, softmax...), with how often each ran: they are not in ``flops``.
        table: MMEngine's per-module table of parameters and FLOPs.
    """
    flops: int
    attention_flops: int
    params: int
    by_operator: Counter = field(default_factory=Counter)
    uncounted_ops: Counter = field(default_factory=Counter)
    table: str = ''


def flop_analyzer(model: nn.Module, inputs: Union[torch.Tensor, Tuple[Any, ...]]) -> FlopAnalyzer:
    """MMEngine's FlopAnalyzer with the scaled-dot-product-attention handle added, quiet."""
    analyzer = FlopAnalyzer(model, inputs)
    analyzer.set_op_handle(**{SDPA_OP: sdpa_flop_jit})
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    analyzer.tracer_warnings('none')
    return analyzer


@torch.no_grad()
def count_complexity(model: nn.Module,
                     inputs: Union[torch.Tensor, Tuple[Any, ...]],
                     table_depth: int = 0) -> Complexity:
    """Trace ``model(*inputs)`` once in eval mode and count its FLOPs and parameters.

    Args:
        model: any module whose forward takes ``inputs`` (a tensor or a tuple of arguments).
        inputs: e.g. one (B, 3, H, W) tensor; FLOPs scale with B.
        table_depth: if > 0, also render the per-module table to this depth.
    """
    was_training = model.training
    model.eval()
    try:
        analyzer = flop_analyzer(model, inputs)
        by_op = analyzer.by_operator()
        complexity = Complexity(
            flops=analyzer.total(),
            attention_flops=by_op.get('scaled_dot_product_attention', 0),
            params=parameter_count(model)[''],
            by_operator=by_op,
            uncounted_ops=analyzer.unsupported_ops(),
            table=complexity_stats_table(analyzer, max_depth=table_depth, show_param_shapes=False)
            if table_depth > 0 else '')
    finally:
        model.train(was_training)
    return complexity
