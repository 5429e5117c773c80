"""Inference throughput (images/s) and peak memory of a module, on CPU or GPU.

The paper's Table 1 convention: a fixed batch (192 there, on one V100), inference only, warm-up
passes first, then the throughput of timed forward passes. Here every timed pass gives one
images/s figure and the median over ``repeats`` is reported (robust to a noisy shared machine).
"""
import contextlib
import os
import re
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch import nn

_CLEAR_REFS = '/proc/self/clear_refs'
_STATUS = '/proc/self/status'


@dataclass
class BenchmarkResult:
    """What :func:`benchmark` measured.

    Attributes:
        images_per_s: median images/s over the timed passes.
        runs: images/s of each timed pass.
        batch_size, input_shape: of the batch that was timed (B, C, H, W).
        device: ``'cpu'`` or ``'cuda:N'``.
        precision: ``'fp32'``, or ``'amp-bf16'`` / ``'amp-fp16'`` (autocast).
        peak_memory_mb: on GPU, the peak memory allocated by tensors during the timed passes
            (``torch.cuda.max_memory_allocated``, weights and input included); on CPU, the
            process's peak resident set size during them (weights and the Python runtime
            included).
        memory_kind: which of the two ``peak_memory_mb`` is.
    """
    images_per_s: float
    runs: List[float] = field(default_factory=list)
    batch_size: int = 0
    input_shape: tuple = ()
    device: str = 'cpu'
    precision: str = 'fp32'
    peak_memory_mb: Optional[float] = None
    memory_kind: str = ''

    def summary(self) -> str:
        mem = f'{self.peak_memory_mb:.0f} MB ({self.memory_kind})' \
            if self.peak_memory_mb is not None else 'not available'
        return (f'{self.images_per_s:.1f} images/s (median of {len(self.runs)} passes, '
                f'min {min(self.runs):.1f}, max {max(self.runs):.1f}); batch {self.batch_size}, '
                f'input {tuple(self.input_shape)}, {self.device}, {self.precision}; '
                f'peak memory {mem}')


class BenchmarkInterrupted(KeyboardInterrupt):
    """A :func:`benchmark` interrupted (Ctrl-C) during its timed passes, after at least one:
    ``result`` holds the passes that finished, ``repeats`` how many were asked for."""

    def __init__(self, result: BenchmarkResult, repeats: int):
        super().__init__(f'interrupted after {len(result.runs)} of {repeats} timed passes')
        self.result, self.repeats = result, repeats


# --------------------------------------------------------------------------- memory
def _read_peak_rss_mb() -> Optional[float]:
    try:
        with open(_STATUS) as f:
            m = re.search(r'^VmHWM:\s+(\d+)\s+kB', f.read(), re.M)
        return int(m.group(1)) / 1024 if m else None
    except OSError:
        return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux: ``5 > clear_refs``)."""
    try:
        with open(_CLEAR_REFS, 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of the code run inside ``with`` (see :class:`BenchmarkResult`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mb: Optional[float] = None
        self.kind = ''

    def __enter__(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = 'CUDA max allocated'
        elif _reset_peak_rss():
            self.kind = 'process peak RSS'
        else:  # no resettable mark: the peak over the whole process lifetime
            self.kind = 'process lifetime peak RSS'
        return self

    def read(self) -> Optional[float]:
        """The peak so far inside ``with`` (MB), without ending the measurement."""
        if self.device.type == 'cuda':
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.kind == 'process peak RSS':
            return _read_peak_rss_mb()
        # ru_maxrss is in kB on Linux, in bytes on macOS (which has no /proc, so comes here)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (
            2**20 if sys.platform == 'darwin' else 2**10)

    def __exit__(self, *exc):
        self.mb = self.read()
        return False


def quiet_cpu_profiler() -> None:
    """Keep ``torch.profiler``'s backend (Kineto) from logging to stderr in this process: on
    every start and stop, and, in a CUDA build on a machine without a GPU, an ``ERROR`` that it
    found none. For CPU profiling, before the process's first profiler starts; a
    ``KINETO_LOG_LEVEL`` of the user's own is kept."""
    os.environ.setdefault('KINETO_LOG_LEVEL', '99')


def peak_live_mb(fn: Callable[[], None]) -> float:
    """Peak of the bytes held by live CPU tensors while ``fn()`` runs, above their level at its
    start: the CPU counterpart of ``torch.cuda.max_memory_allocated``.

    Unlike the peak RSS it leaves out heap the C library keeps after frees, so it does not depend
    on the allocator's state. Every allocation and free of CPU memory is taken from one run under
    ``torch.profiler`` with ``profile_memory=True`` and summed in time order. The profiler does
    not record the free of a tensor allocated before it started, so ``fn`` must free only what
    it allocates, or the peak is overstated: the steps of :func:`~.peers.make_step` start
    without gradients and set them to None at their end.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    quiet_cpu_profiler()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == '[memory]' and e.device_type() == DeviceType.CPU)
    live = peak = 0
    for _, nbytes in deltas:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


# --------------------------------------------------------------------------- timing
def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on a CPU, whose ops return when done)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


#: Autocast dtypes by the names the tools take (``--amp-dtype``) and report (``amp-fp16``).
AMP_DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16}


def autocast_dtype(device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.dtype:
    """``dtype``, or the default autocast dtype of ``device``: fp16 on GPU, bf16 on CPU."""
    return dtype or (torch.float16 if device.type == 'cuda' else torch.bfloat16)


def autocast_context(device: torch.device, amp: bool, dtype: Optional[torch.dtype] = None):
    """(autocast context, precision name) for ``amp`` in :func:`autocast_dtype`; for fp32 a
    null context and ``'fp32'``."""
    if not amp:
        return contextlib.nullcontext(), 'fp32'
    dtype = autocast_dtype(device, dtype)
    name = {v: k for k, v in AMP_DTYPES.items()}.get(dtype, str(dtype))
    return torch.autocast(device.type, dtype=dtype), f'amp-{name}'


@torch.inference_mode()
def benchmark(module: nn.Module,
              inputs: torch.Tensor,
              warmup: int = 3,
              repeats: int = 10,
              amp: bool = False,
              amp_dtype: Optional[torch.dtype] = None,
              log: Callable[[str], None] = print) -> BenchmarkResult:
    """Time ``module(inputs)`` in eval mode.

    Args:
        module: the module to run; it is moved to ``inputs.device``.
        inputs: a (B, C, H, W) batch; B images count as one pass.
        warmup: untimed passes first (allocator, kernel selection, caches).
        repeats: timed passes; the median of their images/s is reported.
        amp: run under autocast (fp16 on GPU, bf16 on CPU by default).
        amp_dtype: autocast dtype overriding the default.
        log: gets a line as each pass ends (``warm-up 1/3: 41.2 s``, ``pass 4/10: 39.8 s``).

    Returns:
        The result of the timed passes.

    Raises:
        ValueError: ``repeats`` < 1 or ``warmup`` < 0.
        BenchmarkInterrupted: Ctrl-C during the timed passes, after one or more of them (the
            result of those in it); before the first, the KeyboardInterrupt itself.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f'need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}')
    device = inputs.device
    module = module.to(device).eval()
    autocast, precision = autocast_context(device, amp, amp_dtype)
    batch = inputs.shape[0]
    runs = []
    interrupted = False
    try:
        with autocast:
            for i in range(warmup):
                start = time.perf_counter()
                module(inputs)
                sync_device(device)
                log(f'warm-up {i + 1}/{warmup}: {time.perf_counter() - start:.1f} s')
            with PeakMemory(device) as mem:
                for i in range(repeats):
                    start = time.perf_counter()
                    module(inputs)
                    sync_device(device)
                    seconds = time.perf_counter() - start
                    runs.append(batch / seconds)
                    log(f'pass {i + 1}/{repeats}: {seconds:.1f} s')
    except KeyboardInterrupt:
        if not runs:
            raise
        interrupted = True
    result = BenchmarkResult(images_per_s=statistics.median(runs), runs=runs, batch_size=batch,
                             input_shape=tuple(inputs.shape), device=str(device),
                             precision=precision, peak_memory_mb=mem.mb, memory_kind=mem.kind)
    if interrupted:
        raise BenchmarkInterrupted(result, repeats)
    return result
