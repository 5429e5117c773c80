"""Model analysis: FLOPs and parameters, throughput and peak memory, training-log plots."""
from .benchmark import BenchmarkResult, benchmark
from .flops import Complexity, count_complexity, sdpa_flop_jit
from .logs import load_json_log, plot_logs
from .model_inputs import (PARTS, build_model, default_input_shape, dummy_batch, load_config,
                           runnable)

__all__ = [
    'BenchmarkResult', 'Complexity', 'PARTS', 'benchmark', 'build_model', 'count_complexity',
    'default_input_shape', 'dummy_batch', 'load_config', 'load_json_log', 'plot_logs', 'runnable',
    'sdpa_flop_jit'
]
