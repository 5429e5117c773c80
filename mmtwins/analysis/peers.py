"""mmtwins side by side with the peer implementations of the same backbones.

Peers: timm (``twins_*``), mmsegmentation 1.x and mmpretrain 1.x (``PCPVT``/``SVT``). Every
implementation is built for the same variant without stage-end norms (and mmseg's and mmpretrain's
block norms with the authors' eps, :func:`_with_block_norm_eps`), so all four compute the same
function on maps of whole LSA windows; mmtwins is loaded with each peer's weights, every
parameter randomised (through its own checkpoint loader), and must reproduce that peer's four
stage maps at 224x224 (on the CPU and, for a GPU run, on the GPU in exact fp32) before anything
is timed. Timings are interleaved (implementations take turns, in orders where each follows
every other equally often) and the median of the repeats is reported.

A process's speed depends on its memory allocator's state, which differs from one process to
the next (measured in docs/benchmarks_history.md: one SVT-S training step 1149 ms in one process and
1445 ms in another, same code). With ``rounds`` > 1 every case runs that many times, each with
fresh worker processes; an entry's time is then the median of its rounds' medians, and the
speed-up's spread over the rounds is reported beside it.

Every implementation runs in its own worker process, driven in turn from the parent (see
:class:`_Workers`): one allocator state per implementation, as in a user's own process, and no
two computing at once.

Memory, four measures:

* ``saved_mb``: bytes of the tensors autograd keeps for the backward pass of one training step
  (unique storages, counted with ``torch.autograd.graph.saved_tensors_hooks``): deterministic.
* ``peak_mb``: the increase of the peak resident set size during the first step over the worker
  process's size before it (on a GPU: peak allocated memory); what a user sees, though noisier.
* ``run_peak_mb``: the same over all the untimed warm-up steps: the high-water mark a training
  run reaches. On a CPU it can exceed the first step's, as the C library's heap grows with the
  holes that later steps' allocations do not fit; it levels off within two or three steps.
* ``live_mb`` (training steps on a CPU): the peak of the bytes held by live tensors during a
  step, above their level at its start (:func:`~mmtwins.analysis.benchmark.peak_live_mb`), the
  CPU counterpart of the GPU's peak allocated memory: the RSS also counts heap the C library
  keeps after frees, which depends on the allocator's history more than on the network.

Each timed step also counts the worker's minor page faults (``page_faults``, median per step):
memory the kernel had to map and zero because the C library had handed freed heap back to it.
On a CPU that cost falls inside the step's time and depends on the allocator's state as much
as on the network, so it says how much of a difference in time is the allocator's.

For inference cases the achieved GFLOP/s (the forward pass's FLOPs, counted by
:func:`mmtwins.analysis.flops.count_complexity`, over the median time) is also reported as a
fraction of the machine's dense matmul GFLOP/s in the case's precision (measured around each
case, :func:`dense_gflops`: the faster of the BLAS and, where mmtwins' linears take it,
oneDNN).

With ``kernels=True`` (``--kernels``) two more steps of every implementation run under
``torch.profiler`` (the second for the operators' input shapes): the first's time by operator
category (matmul, fused attention, convolution, copies, GELU, LayerNorm, other; on a GPU the
kernels' time, next to the step's wall time) and the GFLOP/s its matmul operators reach inside
the network (:func:`kernel_breakdown`), which says how much of a step an implementation's own
layout and element-wise work costs next to the shared kernels.
"""
import argparse
import contextlib
import functools
import json
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from mmtwins.checkpoint import load_twins_checkpoint
from mmtwins.apis.config import cpu_has_native_bf16
from mmtwins.models import PCPVT, SVT
from mmtwins.models.backbones.twins import ARCH_KEYS
from mmtwins.models.layers.block import NORM_EPS
from mmtwins.models.layers.linear import linear, use_onednn
from .benchmark import (PeakMemory, autocast_context, autocast_dtype, peak_live_mb,
                        quiet_cpu_profiler, sync_device)

FAMILIES = {'pcpvt': PCPVT, 'svt': SVT}
PEERS = ('timm', 'mmseg', 'mmpretrain')
#: The arch keys the peers take under mmtwins' names (their window sizes are spelled apart).
SPEC_KEYS = tuple(k for k in ARCH_KEYS if k != 'window_sizes')
_CPUINFO = '/proc/cpuinfo'


class _TimmStages(nn.Module):
    """timm's model returning its four stage maps (no final norm), like the others."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return tuple(self.model.forward_intermediates(x, intermediates_only=True))


def build_impl(impl: str, family: str, arch: str, **kwargs) -> nn.Module:
    """One implementation of ``family``-``arch`` returning the four stage maps (NCHW).

    ``kwargs`` go to mmtwins' constructor only (e.g. ``with_cp=True``). mmseg's and
    mmpretrain's block norms get the authors' eps (:func:`_with_block_norm_eps`).
    """
    cls = FAMILIES[family]
    s = cls.arch_zoo[arch]
    if impl == 'mmtwins':
        return cls(arch=arch, norm_after_stage=False, **kwargs)
    if impl == 'timm':
        import timm
        return _TimmStages(timm.create_model(f'twins_{family}_{arch}', pretrained=False))
    spec = {k: s[k] for k in SPEC_KEYS}
    if impl == 'mmseg':
        from mmseg.models.backbones import twins
        if family == 'svt':
            spec['windiow_sizes'] = s['window_sizes']  # mmseg's spelling
        # mmseg's SVT defaults to drop_path_rate 0.2: a training step would skip branches
        model = getattr(twins, cls.__name__)(**spec, qkv_bias=True, norm_after_stage=False,
                                             drop_path_rate=0.)
    elif impl == 'mmpretrain':
        from mmpretrain.models.backbones import twins
        spec.update(patch_sizes=[4, 2, 2, 2], strides=[4, 2, 2, 2])
        if family == 'svt':
            spec['window_sizes'] = s['window_sizes']
        model = getattr(twins, cls.__name__)(arch=spec, out_indices=(0, 1, 2, 3), qkv_bias=True,
                                             norm_after_stage=False, drop_path_rate=0.)
    else:
        raise ValueError(f'unknown implementation {impl!r}; choose mmtwins or one of {PEERS}')
    model.init_weights()
    return _with_block_norm_eps(model, NORM_EPS)


def _with_block_norm_eps(model: nn.Module, eps: float) -> nn.Module:
    """Set the eps of every block's two LayerNorms (``norm1``, ``norm2``) to ``eps``; returns
    ``model``.

    mmseg and mmpretrain build them with LayerNorm's default eps 1e-5, where the authors'
    release, timm and mmtwins use 1e-6 (the sub-sampling and patch-embedding norms use 1e-5 in
    all four). That is a different function, not rounding: in float64 mmseg's SVT-L differs
    from mmtwins and timm by 9.9e-5 in its last stage map on a 224x224 image (the check's
    tolerance is 1e-4), by 1e-14 with the eps matched. Matched, the agreement check tests the
    weights' mapping and the computation alone; the cost of a step is the same either way.
    """
    for name, m in model.named_modules():
        if isinstance(m, nn.LayerNorm) and name.rsplit('.', 1)[-1] in ('norm1', 'norm2'):
            m.eps = eps
    return model


def available_peers(log=print) -> List[str]:
    """The peers whose Twins backbones import here; an installed one that fails to import (say,
    mmseg 1.2 beside an mmcv it asserts against) is left out with its error logged."""
    import importlib
    import importlib.util
    modules = {'timm': 'timm.models.twins', 'mmseg': 'mmseg.models.backbones.twins',
               'mmpretrain': 'mmpretrain.models.backbones.twins'}
    found = []
    for p in PEERS:
        if importlib.util.find_spec(p) is None:  # not installed: nothing to say
            continue
        try:
            importlib.import_module(modules[p])
        except Exception as e:  # noqa: BLE001 - any import failure leaves the peer out
            log(f'{p} is installed but does not import ({type(e).__name__}: {e}): left out')
            continue
        found.append(p)
    return found


def randomize_parameters_(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Add N(0, ``std``) noise to every parameter of ``model``, in place; returns ``model``.

    After ``init_weights`` every bias and LayerNorm weight is a constant (0 or 1), so a
    checkpoint mapping that swapped two of them (``norm1`` for ``norm2``, the halves of a
    split ``kv`` bias) would still reproduce the peer's outputs. With every tensor distinct, a
    wrong mapping shows as a difference.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p) * std)
    return model


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls and convolutions on CUDA computed in fp32, not TF32, inside ``with``.

    PyTorch lets cuDNN's convolutions use TF32 by default (about 1e-3 relative error), which
    would hide a real difference between two implementations at the 1e-4 tolerance.
    """
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def max_abs_diff_with_peer(peer: nn.Module, family: str, arch: str, x: torch.Tensor) -> float:
    """Load ``peer``'s weights, made distinct by :func:`randomize_parameters_`, into a fresh
    mmtwins model; max |difference| of the stage maps, both run on ``x``'s device and in its
    dtype (fp32: exact, without TF32; float64 leaves only differences of function)."""
    ours = build_impl('mmtwins', family, arch).to(x).eval()
    peer = randomize_parameters_(peer.to(x)).eval()
    sd = peer.model.state_dict() if isinstance(peer, _TimmStages) else peer.state_dict()
    load_twins_checkpoint(ours, sd, logger='silent')
    with torch.inference_mode(), exact_fp32():
        outs, refs = ours(x), peer(x)
    if len(outs) != len(refs):
        raise AssertionError(f'mmtwins gives {len(outs)} stage maps, the peer {len(refs)}')
    return max((a - b).abs().max().item() for a, b in zip(outs, refs))


@functools.lru_cache(maxsize=None)
def peer_agreement(peer: str, family: str, arch: str, device: str = 'cpu') -> float:
    """:func:`max_abs_diff_with_peer` on one 224x224 image (seed 0), where every stage map is
    whole LSA windows: on padded maps the peers differ from mmtwins by design (timm does not mask
    padded keys; mmseg's and mmpretrain's mask switches off when only one side is padded).
    Cached: every case of a variant shares the check."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224).to(device)
    return max_abs_diff_with_peer(build_impl(peer, family, arch), family, arch, x)


# --------------------------------------------------------------------------- one step
def make_step(model: nn.Module, x: torch.Tensor, mode: str, amp: bool = False,
              amp_dtype: Optional[torch.dtype] = None) -> Callable:
    """A closure running one inference pass (``mode='infer'``) or training step (``'train'``),
    under autocast if ``amp`` (``amp_dtype``; default fp16 on GPU, bf16 on CPU)."""
    device = x.device

    def infer():
        with torch.inference_mode(), autocast_context(device, amp, amp_dtype)[0]:
            model(x)

    def train():
        with autocast_context(device, amp, amp_dtype)[0]:
            loss = sum(o.float().mean() for o in model(x))
        loss.backward()
        for p in model.parameters():
            p.grad = None

    model.train(mode == 'train')
    return {'infer': infer, 'train': train}[mode]


def saved_tensor_mb(model: nn.Module, x: torch.Tensor) -> float:
    """MB of unique storages autograd saves for backward in one forward pass (training mode)."""
    seen = {}

    def pack(t):
        if t.device == x.device:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = model(x)
    del outs
    return sum(n for ptr, n in seen.items() if ptr not in params) / 2**20


#: Operator categories of :func:`kernel_breakdown`: (category, operator names, name substrings),
#: names matched before substrings, each in this order; every other operator is ``other``
#: (element-wise ops, reductions such as the bias gradients, softmax of unfused attention, the
#: autograd engine's own time around each backward function). Python time between operators is
#: in no category: it is part of the gap between ``total`` and ``wall_ms``. On CUDA the fused
#: attention's kernels are launched by ``aten::_efficient_attention_forward`` and
#: ``aten::_flash_attention_backward`` and the like, below ``scaled_dot_product_*``. mmtwins'
#: compiled CPU kernels record themselves as ``mmtwins::attention``, ``mmtwins::layer_norm``,
#: ``mmtwins::gelu`` and ``mmtwins::gelu_with_grad``; the weights its MLPs reorder for oneDNN
#: ahead of their products (``aten::mkldnn_reorder_conv2d_weight``) are copies.
KERNEL_CATEGORIES = (
    ('matmul', ('aten::mm', 'aten::addmm', 'aten::addmm_', 'aten::bmm', 'aten::baddbmm',
                'aten::baddbmm_'), ()),
    ('fused attention', (), ('scaled_dot_product', '_attention_forward', '_attention_backward',
                             'mmtwins::attention')),
    ('convolution', (), ('conv',)),
    ('copies', ('aten::copy_', 'aten::cat', 'aten::stack', 'aten::fill_', 'aten::zero_',
                'aten::to_mkldnn', 'aten::mkldnn_reorder_conv2d_weight'), ()),
    ('GELU', (), ('gelu',)),
    ('LayerNorm', (), ('layer_norm',)),
)
CATEGORY_NAMES = tuple(c for c, _, _ in KERNEL_CATEGORIES) + ('other', )


def _category(name: str) -> str:
    """``name``'s category: the one naming it exactly, else the first one with a substring of it
    (``aten::mkldnn_reorder_conv2d_weight`` is a copy, not a convolution)."""
    for category, names, _ in KERNEL_CATEGORIES:
        if name in names:
            return category
    for category, _, parts in KERNEL_CATEGORIES:
        if any(part in name for part in parts):
            return category
    return 'other'


#: Where the convolution operators take their input map and weight: mmtwins' CPU linears
#: run as 1x1 convolutions over a (1, C, 1, M) map (:mod:`..models.layers.linear`). oneDNN's
#: kernels run in :data:`_ONEDNN_CONVS`, which count the FLOPs; the others are dispatch.
_CONV_OPERANDS = {'aten::conv2d': (0, 1), 'aten::convolution': (0, 1),
                  'aten::_convolution': (0, 1), 'aten::mkldnn_convolution': (0, 1),
                  'mkldnn::_convolution_pointwise': (0, 1), 'aten::convolution_backward': (1, 2)}
_ONEDNN_CONVS = ('aten::mkldnn_convolution', 'mkldnn::_convolution_pointwise',
                 'aten::convolution_backward')


def _token_linear(name: str, shapes) -> Optional[Tuple[list, list]]:
    """(input map, weight) shapes where the operator is such a 1x1 convolution, else None."""
    if name not in _CONV_OPERANDS:
        return None
    x, w = (shapes[i] for i in _CONV_OPERANDS[name])
    token_map = len(x) == 4 and x[0] == 1 and x[2] == 1
    return (x, w) if token_map and len(w) == 4 and w[2:] == [1, 1] else None


def _gemm_flops(name: str, shapes, args) -> int:
    """2 x multiply-accumulates of one matmul operator call from its input shapes (``args``,
    its concrete arguments where recorded, give a convolution's backward which of the input
    and weight gradients it computed; both where not recorded)."""
    token = _token_linear(name, shapes)
    if token is not None:
        if name not in _ONEDNN_CONVS:
            return 0
        (_, c, _, m), (o, *_) = token
        grads = 1
        if name == 'aten::convolution_backward':
            mask = args[-1] if args and isinstance(args[-1], list) else [True, True]
            grads = sum(map(bool, mask[:2]))
        return 2 * m * c * o * grads
    a, b = shapes[:2] if name in ('aten::mm', 'aten::bmm') else shapes[1:3]
    return 2 * math.prod(a) * b[-1]


@functools.lru_cache(maxsize=None)
def _warm_profiler(activities: Tuple) -> None:
    """Start and stop ``torch.profiler`` once in this process with ``activities``: its first
    start in a process costs time once, which a profile charges to the operator it lands in
    (about 140 ms on the AMD EPYC Zen 4 CPU, charged to the first linear of PCPVT-S's bf16
    inference step: its ``other`` category read 168 ms, 18 with the warm start)."""
    from torch.profiler import profile
    with profile(activities=list(activities)):
        torch.ones(1).add_(1)


def _profiled_call(step: Callable, activities: list, cuda_device: Optional[torch.device],
                   record_shapes: bool) -> Tuple[list, float]:
    """One call of ``step`` under ``torch.profiler``: its operator events (those the CPU records,
    in the order it ran them) and its wall time in seconds."""
    from torch.autograd import DeviceType
    from torch.profiler import profile
    with profile(activities=activities, record_shapes=record_shapes) as prof:
        start = time.perf_counter()
        step()
        if cuda_device is not None:
            torch.cuda.synchronize(cuda_device)
        wall = time.perf_counter() - start
    # a kernel is counted through the operator launching it
    return [e for e in prof.events() if e.device_type == DeviceType.CPU], wall


def kernel_breakdown(step: Callable, device: Optional[torch.device] = None) -> dict:
    """Where one call of ``step`` spends its time, by operator category: CPU time on a CPU,
    GPU kernel time on a CUDA ``device``.

    ``step`` runs twice under ``torch.profiler`` (started once before in the process:
    :func:`_warm_profiler`): first for the times, then with the operators' input shapes
    recorded, which name the operators that are mmtwins' linears (oneDNN 1x1 convolutions,
    counted as matmuls) and give the matmuls' FLOPs. Recording shapes changes what it measures:
    on the AMD EPYC Zen 4 CPU mmtwins' fp32 SVT-S training step at 512x512 page-faulted 53,500
    times with them and twice without, its GELU category read 63 ms instead of 34 and the GELU
    kernel's calls on 2048 x 1024 chunks took 4.5 ms instead of 0.9 (docs/benchmarks.md, "what
    ``--kernels`` measured with shapes recorded"). Each operator's self time in the first call
    (its own, not its children's; on CUDA, the time of the kernels it launched itself) goes to
    its category of :data:`KERNEL_CATEGORIES`, so the categories add up to the time the
    processor was busy with the step. Where the second call ran other operators (a step whose
    work changes from call to call) its own times are taken, shapes and all
    (``times_with_shapes``).

    Returns:
        dict: ``ms`` (category -> milliseconds, plus ``total``), ``matmul_gflops``, the GFLOP/s
        the matmul operators achieve inside the network, ``wall_ms``, the profiled step's wall
        time (on a GPU, ``total`` below it is time the GPU waited for kernel launches), and
        ``times_with_shapes``.
    """
    from torch.profiler import ProfilerActivity
    cuda = device if device is not None and device.type == 'cuda' else None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda is not None else [])
    if cuda is None:
        quiet_cpu_profiler()
    _warm_profiler(tuple(activities))
    timed, wall = _profiled_call(step, activities, cuda, record_shapes=False)
    shaped, shaped_wall = _profiled_call(step, activities, cuda, record_shapes=True)
    matched = [e.name for e in timed] == [e.name for e in shaped]
    if not matched:
        timed, wall = shaped, shaped_wall
    ms = dict.fromkeys(CATEGORY_NAMES, 0.)
    gemm_flops = 0
    for event, shapes in zip(timed, shaped):
        token = _token_linear(shapes.name, shapes.input_shapes)
        category = 'matmul' if token else _category(event.name)
        own = event.self_cpu_time_total if cuda is None else event.self_device_time_total
        ms[category] += own / 1e3
        if category == 'matmul':
            gemm_flops += _gemm_flops(shapes.name, shapes.input_shapes,
                                      getattr(shapes, 'concrete_inputs', None))
    ms['total'] = sum(ms.values())
    return dict(ms=ms, matmul_gflops=gemm_flops / ms['matmul'] / 1e6 if ms['matmul'] else None,
                wall_ms=wall * 1e3, times_with_shapes=not matched)


# --------------------------------------------------------------------------- workers
@dataclass
class Entry:
    """One timed column: an implementation with constructor kwargs (mmtwins only) and
    precision. Entries named ``mmtwins`` and the peers' names enter the ratios; others
    (``mmtwins-fp32``, ``mmtwins-with_cp``) are mmtwins' own references."""
    name: str
    impl: str
    kwargs: dict = field(default_factory=dict)
    amp: bool = False
    amp_dtype: Optional[torch.dtype] = None


#: glibc malloc settings under which memory freed by a step stays in the process's heap (no
#: block is given its own mapping, the heap is never trimmed), so later steps pay no page faults
#: for it; the peak RSS then stays at the process's high-water mark. Read at process start, so
#: they reach the worker processes when set in the parent's environment before they spawn.
KEEP_FREED_MEMORY = 'glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736'


def keep_freed_memory(environ=os.environ) -> str:
    """Add :data:`KEEP_FREED_MEMORY` to ``GLIBC_TUNABLES`` in ``environ``; returns the value."""
    tunables = environ.get('GLIBC_TUNABLES')
    if KEEP_FREED_MEMORY not in (tunables or ''):
        environ['GLIBC_TUNABLES'] = ':'.join(filter(None, [tunables, KEEP_FREED_MEMORY]))
    return environ['GLIBC_TUNABLES']


def minor_page_faults() -> Optional[int]:
    """This process's minor page faults so far (None where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _first_steps_peaks(step: Callable[[], None], dev: torch.device, steps: int
                       ) -> Tuple[Optional[float], Optional[float]]:
    """Run a fresh worker's first ``steps`` steps (>= 1); return the peak memory of the first
    and of all of them, above the process's size (CPU) or allocated memory (CUDA: the weights
    and the input) before them (None where the peak RSS mark cannot be reset)."""
    with PeakMemory(dev) as before:
        pass
    base = before.mb
    with PeakMemory(dev) as peak:
        step()
        first = peak.read()
        for _ in range(steps - 1):
            step()
    if peak.kind not in ('process peak RSS', 'CUDA max allocated') or None in (
            base, first, peak.mb):
        return None, None
    return first - base, peak.mb - base


def _worker(conn, entry: Entry, family: str, arch: str, mode: str, shape, device: str,
            threads: int) -> None:
    """Serve one implementation's steps to :class:`_Workers` until told to stop."""
    try:
        torch.set_num_threads(threads)
        dev = torch.device(device)
        torch.manual_seed(0)
        x = torch.randn(*shape).to(dev)  # before the model: the same input in every worker
        model = build_impl(entry.impl, family, arch, **entry.kwargs).to(dev)
        step = make_step(model, x, mode, amp=entry.amp, amp_dtype=entry.amp_dtype)
        conn.send(('ok', None))
        while True:
            cmd = conn.recv()
            if cmd == 'stop':
                return
            if isinstance(cmd, tuple) and cmd[0] == 'peak':
                result = _first_steps_peaks(step, dev, cmd[1])
            elif cmd == 'step':
                faults = minor_page_faults()
                start = time.perf_counter()
                step()
                sync_device(dev)
                elapsed = time.perf_counter() - start
                after = minor_page_faults()
                result = (elapsed, None if faults is None else after - faults)
            elif cmd == 'live':
                result = peak_live_mb(step)
            elif cmd == 'kernels':
                result = kernel_breakdown(step, dev)
            elif cmd == 'saved':
                result = saved_tensor_mb(model, x)
                model.train(mode == 'train')
            else:
                raise ValueError(f'unknown worker command {cmd!r}')
            # Every command ends with its GPU work done: no kernel of it still runs when this or
            # another worker starts a timer.
            sync_device(dev)
            conn.send(('ok', result))
    except Exception:  # reported to the parent, which raises
        import traceback
        conn.send(('error', traceback.format_exc()))


class _Workers:
    """One spawned process per entry, driven in turn from this process.

    Each implementation runs in its own fresh interpreter, so none inherits the memory
    allocator's state (heap size, pages already faulted in) left by another; only one process
    computes at a time, so they do not compete for the cores.
    """

    def __init__(self, entries: Sequence[Entry], family: str, arch: str, mode: str, shape,
                 device: str):
        names = [e.name for e in entries]
        if len(set(names)) < len(names):
            raise ValueError(f'each entry needs its own name, got {names}')
        ctx = multiprocessing.get_context('spawn')
        #: entry name -> (this process's end of its pipe, its worker process)
        self.workers: Dict[str, Tuple[Connection, BaseProcess]] = {}
        try:
            for e in entries:
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, daemon=True,
                                   args=(child, e, family, arch, mode, list(shape), device,
                                         torch.get_num_threads()))
                proc.start()
                child.close()  # the worker's end: once the worker exits, recv() raises EOFError
                self.workers[e.name] = parent, proc
            for name in self.workers:
                self._reply(name)
        except BaseException:
            self.close()
            raise

    def _reply(self, name: str):
        try:
            status, value = self.workers[name][0].recv()
        except EOFError:
            raise self._died(name) from None
        if status == 'error':
            raise RuntimeError(f'{name} failed in its worker process:\n{value}')
        return value

    def _died(self, name: str) -> RuntimeError:
        proc = self.workers[name][1]
        proc.join(timeout=5)
        code = proc.exitcode
        how = (f'killed by signal {-code}' + (' (SIGKILL: out of memory?)' if code == -9 else '')
               if code is not None and code < 0 else f'exit code {code}')
        return RuntimeError(f'the worker process of {name} died ({how}; its own error, if it '
                            'printed one, is on stderr above)')

    def ask(self, name: str, cmd):
        """Send ``cmd`` (a command name, or ``('peak', steps)``) to ``name``'s worker; its
        answer."""
        try:
            self.workers[name][0].send(cmd)
        except (BrokenPipeError, ConnectionResetError):
            raise self._died(name) from None
        return self._reply(name)

    def close(self):
        for conn, _ in self.workers.values():
            try:
                conn.send('stop')
            except (BrokenPipeError, OSError):
                pass
        for _, proc in self.workers.values():
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def balanced_orders(n: int) -> List[List[int]]:
    """Orders of ``range(n)`` (a Williams design): ``n`` of them for even ``n``, ``2n`` for odd
    ``n`` (with their reverses), in which each index takes every position equally often and
    directly follows every other index equally often, so no implementation always runs right
    after the same one (whose cache and memory traffic it would inherit)."""
    first, low, high = [0], 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    orders = [[(i + r) % n for i in first] for r in range(n)]
    return orders + [o[::-1] for o in orders] if n % 2 else orders


def interleaved_times(workers: _Workers, names: Sequence[str], repeats: int
                      ) -> Dict[str, List[Tuple[float, Optional[int]]]]:
    """(seconds, minor page faults) of each step of each entry, taking turns in the orders of
    :func:`balanced_orders`, one per repeat."""
    names = list(names)
    orders = balanced_orders(len(names))
    times = {n: [] for n in names}
    for r in range(repeats):
        for i in orders[r % len(orders)]:
            times[names[i]].append(workers.ask(names[i], 'step'))
    return times


# --------------------------------------------------------------------------- the comparison
def _speedup(seconds: Dict[str, float]) -> Optional[float]:
    if 'mmtwins-fp32' in seconds:
        return seconds['mmtwins-fp32'] / seconds['mmtwins']
    peers = [t for n, t in seconds.items() if n in PEERS]
    return min(peers) / seconds['mmtwins'] if peers else None


@dataclass
class CaseResult:
    """One (variant, mode, input) case: per entry, median seconds and memory.

    ``seconds``: the median step time (over several rounds of fresh processes, the median of the
    rounds' medians, which ``round_seconds`` lists);
    ``gflops``: the case's forward GFLOP (2 x multiply-accumulates, attention included);
    ``dense_gflops``: this machine's dense matmul GFLOP/s in the case's precision (fp32, or
    the autocast dtype) by kernel (:func:`dense_gflops`), each the better of two measurements
    taken just before and just after the case's steps; ``matmul_gflops``: the best of them.
    """
    variant: str
    mode: str
    shape: List[int]
    precision: str
    seconds: Dict[str, float] = field(default_factory=dict)
    saved_mb: Dict[str, float] = field(default_factory=dict)
    peak_mb: Dict[str, Optional[float]] = field(default_factory=dict)
    run_peak_mb: Dict[str, Optional[float]] = field(default_factory=dict)
    live_mb: Dict[str, float] = field(default_factory=dict)  # CPU training: peak live tensors
    page_faults: Dict[str, float] = field(default_factory=dict)  # median minor faults per step
    max_abs_diff: Dict[str, float] = field(default_factory=dict)
    device_max_abs_diff: Dict[str, float] = field(default_factory=dict)  # on a GPU, exact fp32
    cosine: Optional[float] = None  # autocast cases: output cosine similarity with fp32
    gflops: Optional[float] = None
    matmul_gflops: Optional[float] = None
    dense_gflops: Dict[str, float] = field(default_factory=dict)
    interleaved: bool = True
    kernels: Dict[str, dict] = field(default_factory=dict)  # entry -> kernel_breakdown()
    round_seconds: Dict[str, List[float]] = field(default_factory=dict)  # per round: median

    def speedup(self) -> Optional[float]:
        """Fastest peer's median time over mmtwins' (> 1: mmtwins is faster); for an autocast
        case, mmtwins' fp32 time over its autocast time. Over several rounds, the median of the
        rounds' speed-ups, each from the times of one round's processes (the medians of the
        entries' times over the rounds would pair times of different rounds)."""
        ups = self.round_speedups()
        return statistics.median(ups) if ups else _speedup(self.seconds)

    def round_speedups(self) -> List[float]:
        """The speed-up of each round, each from that round's fresh processes (empty for a
        single round, and where a round has none: no peer to compare with)."""
        rounds = self.round_seconds.values()
        if min(map(len, rounds), default=0) < 2:
            return []
        ups = [_speedup(dict(zip(self.round_seconds, ts))) for ts in zip(*rounds)]
        return [] if None in ups else ups

    def memory_ratio(self, kind: str = 'saved_mb') -> Optional[float]:
        """mmtwins' memory over the leanest peer's (< 1: mmtwins is leaner)."""
        mem = getattr(self, kind)
        peers = [m for n, m in mem.items() if n in PEERS and m]
        return mem['mmtwins'] / min(peers) if peers and mem.get('mmtwins') else None

    def with_cp_saving(self, kind: str = 'peak_mb') -> Optional[float]:
        """Fraction of mmtwins' peak memory (``kind``: ``'peak_mb'``, ``'run_peak_mb'`` or
        ``'live_mb'``) that ``with_cp=True`` removes (if measured)."""
        mem = getattr(self, kind)
        full, cp = mem.get('mmtwins'), mem.get('mmtwins-with_cp')
        return 1 - cp / full if full and cp else None

    def flops_fraction(self, name: str = 'mmtwins') -> Optional[float]:
        """GFLOP/s achieved by ``name`` over the dense matmul GFLOP/s (inference cases)."""
        if self.mode != 'infer' or not self.gflops or not self.matmul_gflops:
            return None
        return self.gflops / self.seconds[name] / self.matmul_gflops


def compare_case(family: str, arch: str, mode: str, shape: Sequence[int], peers: Sequence[str],
                 device: str = 'cpu', amp: bool = False,
                 amp_dtype: Optional[torch.dtype] = None, warmup: int = 2, repeats: int = 5,
                 memory: bool = True, with_cp: bool = False, interleave: bool = True,
                 kernels: bool = False, rounds: int = 1, tol: float = 1e-4,
                 log=print) -> CaseResult:
    """Check agreement with every peer, then time (and measure the memory of) one case.

    Agreement (:func:`peer_agreement`) is checked on the CPU and, when ``device`` is a GPU, on
    it too (in exact fp32, :func:`exact_fp32`); the timed steps use the device's default
    settings, as a user's run would.

    Every entry runs in its own worker process (:class:`_Workers`): first ``warmup`` untimed
    steps (at least one), which give the peak memory of the first step and of all of them, then
    ``repeats`` timed ones (taking turns with the other entries if ``interleave``), then
    the memory counts that profile a step. With ``rounds`` > 1 all of it but the agreement
    check and the memory counts runs again with fresh processes, ``rounds`` times in all.

    Args:
        amp: run under autocast in ``amp_dtype`` (default fp16 on GPU, bf16 on CPU): mmtwins
            and every peer if ``peers`` are given, else mmtwins against its own fp32.
        memory: report the peak memory of the first step and of the warm-up steps; for
            training steps also count the bytes saved for backward and, on a CPU, the peak of
            live tensor bytes.
        with_cp: also run mmtwins with gradient checkpointing (training cases).
        kernels: after the timed steps, profile one more step of every entry
            (:func:`kernel_breakdown`).
        interleave: keep every entry's worker alive and take turns (default); False runs the
            entries one after another, one process at a time (large inputs: the processes'
            memory side by side would not fit), so slow drifts of the machine are not averaged
            out.
        rounds: how many times to start fresh worker processes and time them; each entry's
            time and page faults are the medians of its rounds' medians, its peak memory the
            median of its rounds' peaks; the bytes saved for backward, the peak of live
            tensors and the kernel profile come from the first round.
    """
    if rounds < 1:
        raise ValueError(f'rounds must be >= 1, got {rounds}')
    dev = torch.device(device)
    res = CaseResult(f'{family}-{arch}', mode, list(shape),
                     autocast_context(dev, amp, amp_dtype)[1], interleaved=interleave)
    for p in peers:
        res.max_abs_diff[p] = peer_agreement(p, family, arch)
        if dev.type != 'cpu':
            res.device_max_abs_diff[p] = peer_agreement(p, family, arch, device)
        worst = max(res.max_abs_diff[p], res.device_max_abs_diff.get(p, 0.))
        if worst > tol:
            raise AssertionError(f'mmtwins disagrees with {p} on {family}-{arch}: max abs '
                                 f'difference {worst:.3g} > {tol}')
    amp_kw = dict(amp=amp, amp_dtype=amp_dtype)
    entries = [Entry('mmtwins', 'mmtwins', **amp_kw)]
    if amp:
        res.cosine = autocast_cosine(build_impl('mmtwins', family, arch).to(dev),
                                     torch.randn(*shape, device=dev), amp_dtype)
    if amp and not peers:
        entries.append(Entry('mmtwins-fp32', 'mmtwins'))
    else:
        entries += [Entry(p, p, **amp_kw) for p in peers]
        if with_cp and mode == 'train':
            entries.append(Entry('mmtwins-with_cp', 'mmtwins', dict(with_cp=True), **amp_kw))
    if mode == 'infer':
        from .flops import count_complexity
        macs = count_complexity(build_impl('mmtwins', family, arch), torch.randn(*shape)).flops
        res.gflops = 2 * macs / 1e9
    ceiling_dtype = autocast_dtype(dev, amp_dtype) if amp else torch.float32
    dense = dense_gflops(device, ceiling_dtype)
    # Interleaved: every worker alive at once. One at a time: each entry's steps in a block, for
    # cases where several processes' memory would not fit side by side.
    groups = [entries] if interleave else [[e] for e in entries]
    peaks, faults = {}, {}
    for rnd in range(rounds):
        if rounds > 1:
            log(f'{res.variant} {res.mode} {"x".join(map(str, shape))}: round {rnd + 1} of '
                f'{rounds}')
        for group in groups:
            with _Workers(group, family, arch, mode, shape, device) as workers:
                for e in group:
                    peaks.setdefault(e.name, []).append(
                        workers.ask(e.name, ('peak', max(warmup, 1))))
                times = interleaved_times(workers, [e.name for e in group], repeats)
                for e in group if rnd == 0 else []:  # counted and profiled in round 1 only
                    if memory and mode == 'train' and not amp:
                        res.saved_mb[e.name] = workers.ask(e.name, 'saved')
                    if memory and mode == 'train' and dev.type == 'cpu':
                        res.live_mb[e.name] = workers.ask(e.name, 'live')
                    if kernels:
                        res.kernels[e.name] = workers.ask(e.name, 'kernels')
            for n, steps in times.items():
                res.round_seconds.setdefault(n, []).append(
                    statistics.median(t for t, _ in steps))
                if all(f is not None for _, f in steps):
                    faults.setdefault(n, []).append(statistics.median(f for _, f in steps))
    # The ceiling: the better of two measurements, before and after the timed steps.
    after = dense_gflops(device, ceiling_dtype)
    res.dense_gflops = {k: max(g, after[k]) for k, g in dense.items()}
    res.matmul_gflops = max(res.dense_gflops.values())
    res.seconds = {n: statistics.median(ts) for n, ts in res.round_seconds.items()}
    res.page_faults = {n: statistics.median(fs) for n, fs in faults.items()
                       if len(fs) == rounds}
    if memory:
        for n, ps in peaks.items():
            res.peak_mb[n], res.run_peak_mb[n] = (
                None if None in vals else statistics.median(vals) for vals in zip(*ps))
    for line in [format_case(res)] + format_kernels(res):
        log(line)
    return res


def autocast_cosine(model: nn.Module, x: torch.Tensor,
                    amp_dtype: Optional[torch.dtype] = None) -> float:
    """Cosine similarity of the concatenated stage maps under autocast and in exact fp32.

    Computed in float64: fp32 sums over millions of elements put it up to ~2e-4 off (above 1
    for SVT-L at 512x512 batch 2), the size of the differences it is meant to show."""
    model.eval()
    with torch.inference_mode():
        with exact_fp32():
            ref = torch.cat([o.flatten() for o in model(x)])
        with autocast_context(x.device, True, amp_dtype)[0]:
            low = torch.cat([o.float().flatten() for o in model(x)])
    return torch.nn.functional.cosine_similarity(ref.double(), low.double(), dim=0).item()


def dense_gflops(device: str = 'cpu', dtype: torch.dtype = torch.float32,
                 n: Optional[int] = None, repeats: int = 10) -> Dict[str, float]:
    """Dense matmul GFLOP/s of this machine in ``dtype`` by kernel, n x n by n x n: n = 2048 on
    a CPU, 8192 on a GPU (which a smaller product does not fill). ``blas`` is ``a @ b`` as the
    device runs it by default (on CUDA: no TF32; on a CPU in fp32: MKL); ``onednn``, where
    mmtwins' linears take it (a CPU in fp32, and in bf16 on some CPUs:
    :func:`..models.layers.linear.use_onednn`), is the same product through that route. The
    best of them is the ceiling of the GFLOP/s fractions."""
    dev = torch.device(device)
    n = n or (2048 if dev.type == 'cpu' else 8192)
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    kernels = {'blas': lambda: a @ b}
    if use_onednn(a, b):
        kernels['onednn'] = lambda: linear(a, b)
    rates = {}
    for name, product in kernels.items():
        product()
        sync_device(dev)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            product()
            sync_device(dev)
            best = min(best, time.perf_counter() - start)
        rates[name] = 2 * n**3 / best / 1e9
    return rates


def _ms(seconds: float) -> str:
    """Milliseconds with three significant digits or more: 1609, 41.3, 4.27."""
    ms = seconds * 1e3
    return f'{ms:.{0 if ms >= 100 else 1 if ms >= 10 else 2}f}'


def _spread(r: CaseResult) -> str:
    """The lowest and highest of the rounds' speed-ups: '0.95-1.10x'."""
    ups = r.round_speedups()
    return f'{min(ups):.2f}-{max(ups):.2f}x'


def _mem(r: CaseResult, kind: str) -> str:
    mem = getattr(r, kind)
    return ', '.join(f'{n} {m:.0f}' if m else f'{n} ?' for n, m in mem.items())


#: The checkout this module runs from, if it runs from one (not an installed package): its git
#: history is what :func:`code_version` and :func:`mmtwins.analysis.ab.revision_arm` read.
CHECKOUT = Path(__file__).resolve().parents[2]


def code_version(root: Path = CHECKOUT) -> Optional[dict]:
    """Which code ran: ``{'commit': HEAD's hash, 'dirty': whether mmtwins/ has uncommitted
    changes}`` when ``root`` is the top of the git checkout that holds this package; None
    otherwise (an installed package, or no git)."""
    def git(*cmd):
        return subprocess.run(['git', *cmd], cwd=root, check=True, capture_output=True,
                              text=True).stdout.strip()

    try:
        if Path(git('rev-parse', '--show-toplevel')).resolve() != Path(root).resolve():
            return None
        return dict(commit=git('rev-parse', 'HEAD'),
                    dirty=bool(git('status', '--porcelain', '--', 'mmtwins')))
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_info(device: str = 'cpu') -> dict:
    """What the timings depend on: CPU model and vector ISA, AMX, threads, torch, the C
    library's malloc settings (``GLIBC_TUNABLES``, see :data:`KEEP_FREED_MEMORY`), native bf16,
    GPU.

    ``cpu_amx`` (the ``amx_bf16`` flag of ``/proc/cpuinfo``; None where that file is missing)
    and ``cpu_family_model`` (its x86 ``cpu family/model``, e.g. ``26/2``, a Zen 5 EPYC; None
    where it lacks them) tell apart CPUs that ``cpu_capability`` and a virtual machine's CPU name
    (``AMD EPYC``) report alike, whose bf16 speed differs (docs/benchmarks_history.md:
    autocast inference 2.0-2.8x fp32 with AMX, 1.45-1.57x with AVX512-BF16 alone on an older
    EPYC, 2.24-2.48x on the Zen 5 one). On a GPU also its name, the CUDA and cuDNN versions and
    whether fp32 matmuls and convolutions may use TF32 (PyTorch's defaults: matmuls no, cuDNN
    convolutions yes).
    """
    cpu, flags = platform.processor() or platform.machine(), None
    family_model = {}
    try:
        with open(_CPUINFO) as f:
            for line in f:
                key, _, value = line.partition(':')
                if key.strip() == 'model name':
                    cpu = value.strip()
                elif key.strip() in ('cpu family', 'model'):
                    family_model[key.strip()] = value.strip()
                elif key.strip() == 'flags':
                    flags = value.split()
                    break
    except OSError:
        pass
    info = dict(cpu=cpu,
                cpu_family_model=(f"{family_model['cpu family']}/{family_model['model']}"
                                  if len(family_model) == 2 else None),
                cpu_capability=torch.backends.cpu.get_cpu_capability(),
                cpu_amx=None if flags is None else 'amx_bf16' in flags,
                cores=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
                glibc_tunables=os.environ.get('GLIBC_TUNABLES'),
                cpu_native_bf16=cpu_has_native_bf16(),
                device=device)
    if device.startswith('cuda'):
        info.update(gpu=torch.cuda.get_device_name(torch.device(device)),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    tf32_cudnn=torch.backends.cudnn.allow_tf32)
    return info


def format_case(r: CaseResult) -> str:
    """One line per case: times, ratios, memory, GFLOP/s fraction."""
    cols = ', '.join(f'{n} {_ms(t)} ms' for n, t in r.seconds.items())
    if r.cosine is not None:
        cols += f' (cosine similarity with fp32 {r.cosine:.5f})'
    against = 'own fp32' if 'mmtwins-fp32' in r.seconds else 'fastest peer'
    line = (f'{r.variant:>11} {r.mode:<5} {"x".join(map(str, r.shape)):<14} {r.precision:<8} '
            f'{cols}; speed-up vs {against} {r.speedup() or float("nan"):.2f}x')
    if r.round_speedups():
        line += f' ({_spread(r)} over {len(r.round_speedups())} rounds)'
    for diffs, where in ((r.max_abs_diff, ''), (r.device_max_abs_diff, ' on the GPU')):
        if diffs:
            line += f'; stage maps agree{where}: max abs diff ' + ', '.join(
                f'{p} {d:.1e}' for p, d in diffs.items())
    if r.flops_fraction() is not None:
        line += (f'; {r.gflops / r.seconds["mmtwins"]:.0f} GFLOP/s = '
                 f'{r.flops_fraction():.2f} of dense matmul ({r.matmul_gflops:.0f}: '
                 + ', '.join(f'{k} {g:.0f}' for k, g in r.dense_gflops.items()) + ')')
    if r.saved_mb:
        line += (f'; saved-for-backward MB {_mem(r, "saved_mb")} '
                 f'(ratio {r.memory_ratio() or float("nan"):.2f})')
    for kind, what in (('peak_mb', 'peak MB'), ('run_peak_mb', 'peak MB over the warm-up')):
        if any(getattr(r, kind).values()):
            line += f'; {what} {_mem(r, kind)}'
            if r.memory_ratio(kind) is not None:
                line += f' (ratio {r.memory_ratio(kind):.2f})'
    if r.live_mb:
        line += (f'; peak live MB {_mem(r, "live_mb")} '
                 f'(ratio {r.memory_ratio("live_mb") or float("nan"):.2f})')
    if r.page_faults:
        line += '; page faults per step ' + ', '.join(
            f'{n} {f:.0f}' for n, f in r.page_faults.items())
    saving = [f'{r.with_cp_saving(k):.0%} of the {what}'
              for k, what in (('peak_mb', 'peak'), ('run_peak_mb', 'peak over the warm-up'),
                              ('live_mb', 'peak live'))
              if r.with_cp_saving(k) is not None]
    if saving:
        line += f'; with_cp saves {" and ".join(saving)}'
    return line


def format_kernels(r: CaseResult) -> List[str]:
    """One line per profiled entry of ``r``: its step's time by operator category."""
    lines = []
    for name, k in r.kernels.items():
        ms = k['ms']
        parts = ', '.join(f'{c} {t:.1f} ({t / ms["total"]:.0%})' for c, t in ms.items()
                          if c != 'total')
        gemm = f'; matmuls at {k["matmul_gflops"]:.0f} GFLOP/s' if k['matmul_gflops'] else ''
        shapes = ('; timed with its shapes recorded (the step ran other operators when profiled '
                  'again)' if k.get('times_with_shapes') else '')
        lines.append(f'    {name}: profiled step {ms["total"]:.1f} ms busy '
                     f'({k["wall_ms"]:.1f} ms wall) = {parts}{gemm}{shapes}')
    return lines


def format_markdown(results: List[CaseResult]) -> str:
    """The results as a Markdown table (milliseconds, MB), as in docs/benchmarks.md."""
    names = []
    for r in results:
        names += [n for n in r.seconds if n not in names]

    def cell(d, n, fmt):
        return fmt.format(d[n]) if d.get(n) is not None else ''

    head = ['variant', 'case', 'precision'] + [f'{n} ms' for n in names] + \
        ['speed-up', 'GFLOP/s fraction'] + [f'{n} peak MB' for n in names] + \
        ['peak ratio'] + [f'{n} warm-up peak MB' for n in names] + \
        ['warm-up peak ratio', 'saved-for-backward ratio']
    live = any(r.live_mb for r in results)
    if live:
        head += [f'{n} peak live MB' for n in names] + ['peak live ratio']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in results:
        case = f'{r.mode} {"x".join(map(str, r.shape))}' + ('' if r.interleaved else ' (*)')
        row = [r.variant, case, r.precision]
        row += [_ms(r.seconds[n]) if n in r.seconds else '' for n in names]
        speedup = f'{r.speedup():.2f}x' if r.speedup() else ''
        if speedup and r.round_speedups():
            speedup += f' ({_spread(r)})'
        row += [speedup, f'{r.flops_fraction():.2f}' if r.flops_fraction() else '']
        for kind in ('peak_mb', 'run_peak_mb'):
            row += [cell(getattr(r, kind), n, '{:.0f}') for n in names]
            row.append(f'{r.memory_ratio(kind):.2f}' if r.memory_ratio(kind) else '')
        row.append(f'{r.memory_ratio():.2f}' if r.memory_ratio() else '')
        if live:
            row += [cell(r.live_mb, n, '{:.0f}') for n in names]
            row.append(f'{r.memory_ratio("live_mb"):.2f}' if r.memory_ratio('live_mb') else '')
        lines.append('| ' + ' | '.join(row) + ' |')
    if any(r.round_speedups() for r in results):
        lines.append("\nspeed-up (a-b): the lowest and highest of the rounds' speed-ups, each "
                     'round with fresh processes')
    if not all(r.interleaved for r in results):
        lines.append('\n(*) implementations run one after another, not interleaved')
    if any(r.kernels for r in results):
        lines += ['', _kernels_markdown(results)]
    return '\n'.join(lines)


def _kernels_markdown(results: List[CaseResult]) -> str:
    """The kernel breakdowns: one row per profiled entry, each category's share of its step."""
    head = ['variant', 'case', 'implementation', 'profiled ms (wall)',
            *(f'{c} %' for c in CATEGORY_NAMES), 'matmul GFLOP/s']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in results:
        for name, k in r.kernels.items():
            ms = k['ms']
            row = [r.variant, f'{r.mode} {"x".join(map(str, r.shape))}', name,
                   f'{ms["total"]:.1f} ({k["wall_ms"]:.1f})',
                   *(f'{100 * ms[c] / ms["total"]:.0f}'
                                           for c in CATEGORY_NAMES)]
            row.append(f'{k["matmul_gflops"]:.0f}' if k['matmul_gflops'] else '')
            lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


def to_json(results: List[CaseResult], extra: dict) -> str:
    return json.dumps(dict(extra, cases=[dict(asdict(r), speedup=r.speedup(),
                                              round_speedups=r.round_speedups(),
                                              saved_ratio=r.memory_ratio(),
                                              peak_ratio=r.memory_ratio('peak_mb'),
                                              run_peak_ratio=r.memory_ratio('run_peak_mb'),
                                              live_ratio=r.memory_ratio('live_mb'),
                                              with_cp_saving=r.with_cp_saving(),
                                              with_cp_run_saving=r.with_cp_saving(
                                                  'run_peak_mb'),
                                              with_cp_live_saving=r.with_cp_saving('live_mb'),
                                              flops_fraction=r.flops_fraction())
                                         for r in results]), indent=2)


# --------------------------------------------------------------------------- a run of cases
#: name: (mode, input shape, autocast): None (fp32), 'own' (mmtwins against its own fp32) or
#: 'peers' (every implementation under autocast). ``coco`` also runs mmtwins with ``with_cp``,
#: the implementations one at a time (five side by side would not fit in 24 GiB).
CASES = {
    'infer224': ('infer', (8, 3, 224, 224), None),
    'infer512': ('infer', (2, 3, 512, 512), None),
    'train512': ('train', (2, 3, 512, 512), None),
    'amp512': ('infer', (2, 3, 512, 512), 'own'),
    'coco': ('train', (1, 3, 800, 1344), None),
    'amp-infer512': ('infer', (2, 3, 512, 512), 'peers'),
    'amp-train512': ('train', (2, 3, 512, 512), 'peers'),
}
DEFAULT_CASES = ('infer224', 'infer512', 'train512', 'amp512')
#: How :data:`TARGETS` name the cases.
CASE_LABELS = {'infer224': 'inference 224x224 b8 fp32', 'infer512': 'inference 512x512 b2 fp32',
               'train512': 'training step 512x512 b2 fp32',
               'amp512': 'bf16 autocast inference 512x512 b2', 'coco': 'training step 800x1344 b1'}


@dataclass(frozen=True)
class Target:
    """One of issue 7's targets for a CPU: ``measure`` of a ``case``'s result at least (or with
    ``at_least`` False, at most) ``bound``, shown with ``fmt``."""
    case: str
    what: str
    measure: Callable[[CaseResult], Optional[float]]
    bound: float
    fmt: str = '{:.2f}x'
    at_least: bool = True

    def label(self) -> str:
        return (f'{CASE_LABELS[self.case]}: {self.what} {">=" if self.at_least else "<="} '
                + self.fmt.format(self.bound))


TARGETS = (
    Target('train512', 'speed-up against the fastest peer', CaseResult.speedup, 1.2),
    Target('train512', "first step's peak RSS rise against the leanest peer's",
           lambda r: r.memory_ratio('peak_mb'), 0.8, '{:.2f}', at_least=False),
    Target('infer224', 'speed-up against the fastest peer', CaseResult.speedup, 1.1),
    Target('infer512', 'speed-up against the fastest peer', CaseResult.speedup, 1.1),
    Target('amp512', "speed-up against mmtwins' own fp32", CaseResult.speedup, 1.8),
    Target('amp512', 'cosine similarity of the outputs with fp32', lambda r: r.cosine, 0.999,
           '{:.5f}'),
    Target('coco', "with_cp's cut of mmtwins' first-step peak RSS", CaseResult.with_cp_saving,
           0.4, '{:.0%}'),
    Target('infer224', 'GFLOP/s over dense matmul GFLOP/s', CaseResult.flops_fraction, 0.85,
           '{:.2f}'),
    Target('infer512', 'GFLOP/s over dense matmul GFLOP/s', CaseResult.flops_fraction, 0.85,
           '{:.2f}'),
)


def case_name(r: CaseResult) -> Optional[str]:
    """The :data:`CASES` name of a CPU result run as that case asks: its input, its precision
    as :func:`compare_case` names the CPU's default one (autocast in bf16), and its entries
    (mmtwins' own fp32 for ``amp512``, ``with_cp`` for ``coco``); None for any other (another
    batch size, fp16)."""
    for name, (mode, shape, amp) in CASES.items():
        precision = autocast_context(torch.device('cpu'), amp is not None)[1]
        if (r.mode, tuple(r.shape), r.precision) == (mode, shape, precision) and (
                (amp == 'own') == ('mmtwins-fp32' in r.seconds)) and (
                name != 'coco' or 'mmtwins-with_cp' in r.seconds):
            return name
    return None


def issue_targets(results: Sequence[CaseResult]) -> List[dict]:
    """Each of :data:`TARGETS` that ``results`` (of a CPU run) measure, in their order:
    ``{'variant', 'case', 'target', 'value', 'shown', 'reached'}``, ``shown`` the value as the
    target writes it (value, shown and reached None: not measured, as a memory ratio with
    ``--no-memory``, so not judged)."""
    rows = []
    for r in results:
        case = case_name(r)
        for t in (t for t in TARGETS if t.case == case):
            value = t.measure(r)
            reached = None if value is None else (
                value >= t.bound if t.at_least else value <= t.bound)
            rows.append(dict(variant=r.variant, case=t.case, target=t.label(), value=value,
                             shown=None if value is None else t.fmt.format(value),
                             reached=reached))
    return rows


def format_targets(rows: Sequence[dict]) -> str:
    """:func:`issue_targets`' rows as a Markdown table."""
    lines = ['| variant | target of issue 7 | this run | |', '|---|---|---|---|']
    verdicts = {True: 'reached', False: '**missed**', None: 'not judged'}
    lines += [f'| {t["variant"]} | {t["target"]} | {t["shown"] or "not measured"} | '
              f'{verdicts[t["reached"]]} |' for t in rows]
    return '\n'.join(lines)


#: ``--short`` (CI): per variant, the agreement check and one timed inference of one image.
SHORT_SHAPE = (1, 3, 224, 224)
SHORT = dict(warmup=1, repeats=1, memory=False, rounds=1)
SMALL_VARIANTS = ('pcpvt-small', 'svt-small')
ALL_VARIANTS = tuple(f'{f}-{a}' for f in FAMILIES for a in ('small', 'base', 'large'))
#: The archs' initials, as the configs spell them (``twins_svt_s``): ``svt-s`` is ``svt-small``.
ARCH_INITIALS = {'s': 'small', 'b': 'base', 'l': 'large'}


def full_variant_name(name: str) -> str:
    """``name`` as one of :data:`ALL_VARIANTS` where it is a variant spelled short: the arch as
    its initial (``svt-s``: ``svt-small``) or left out (``svt``: its small arch); any other name
    is returned as given (for ``argparse`` to check against ``ALL_VARIANTS`` after it)."""
    family, _, arch = name.partition('-')
    if family not in FAMILIES:
        return name
    return f'{family}-{ARCH_INITIALS.get(arch, arch or "small")}'


def add_variants_argument(parser: argparse.ArgumentParser, allow_all: bool = False) -> None:
    """``--variants``: some of :data:`ALL_VARIANTS`, short names spelled out
    (:func:`full_variant_name`) and checked by argparse before anything runs; default the small
    ones. With ``allow_all``, ``all`` too (every variant; the caller refuses it beside others)."""
    parser.add_argument(
        '--variants', nargs='+', default=list(SMALL_VARIANTS), type=full_variant_name,
        choices=[*ALL_VARIANTS, *(['all'] if allow_all else [])], metavar='VARIANT',
        help=f"some of {', '.join(ALL_VARIANTS)} (or short: svt-s, pcpvt-b; a family alone is "
        "its small arch)" + (", or 'all' alone" if allow_all else '')
        + ' (default: the small ones)')


def plan(variants: Sequence[str], cases: Sequence[str], kw: dict, batch: Optional[int] = None,
         short: bool = False) -> List[Tuple[str, str, Tuple[int, ...], dict]]:
    """The runs of :func:`run_plan`: ``(variant, mode, input shape, compare_case kwargs)``.

    ``kw`` holds :func:`compare_case`'s common keyword arguments (``peers`` among them);
    ``batch`` replaces every case's own batch size; ``short`` (CI) runs, instead of ``cases``,
    one inference at 224x224 batch 1 per variant: the agreement check, one timed step, no
    memory measured.
    """
    jobs = []
    for v in variants:
        if short:
            jobs.append((v, 'infer', SHORT_SHAPE, dict(kw, **SHORT)))
            continue
        for case in cases:
            mode, shape, amp = CASES[case]
            if batch:
                shape = (batch, *shape[1:])
            jobs.append((v, mode, shape, dict(kw, peers=[] if amp == 'own' else kw['peers'],
                                              amp=amp is not None, with_cp=case == 'coco',
                                              interleave=case != 'coco')))
    return jobs


def run_plan(jobs, extra: dict, out: Optional[str] = None, markdown: Optional[str] = None,
             targets: bool = False, log=print) -> List[CaseResult]:
    """Run :func:`plan`'s jobs, logging a line as each starts (``case 3/8: svt-small train
    2x3x512x512 fp32``); after each, rewrite ``out`` (JSON, with ``extra``) and ``markdown``, so
    an interrupted run keeps the cases it finished. The JSON's ``planned`` lists every job
    (variant, mode, shape, amp) and ``finished`` is false until the last one's results are in
    (the Markdown then ends in a line saying how many cases it holds of how many). With
    ``targets`` (a CPU run), the JSON's ``targets`` and a second Markdown table judge issue 7's
    targets (:func:`issue_targets`) on the cases run so far, and the log shows them at the end.

    Returns the results of the jobs, in order.
    """
    from mmtwins.engine.fileio import atomic_write
    planned = [dict(variant=v, mode=mode, shape=list(shape), amp=bool(case_kw.get('amp')))
               for v, mode, shape, case_kw in jobs]
    results, judged = [], []
    for i, (v, mode, shape, case_kw) in enumerate(jobs, 1):
        log(f'case {i}/{len(jobs)}: {v} {mode} {"x".join(map(str, shape))} '
            f'{"amp" if case_kw.get("amp") else "fp32"}')
        family, arch = v.split('-')
        results.append(compare_case(family, arch, mode, shape, **case_kw))
        finished = i == len(jobs)
        judged = issue_targets(results) if targets else []
        if out:
            atomic_write(out, to_json(results, dict(extra, planned=planned, finished=finished,
                                                    **({'targets': judged} if targets else {}))))
        if markdown:
            atomic_write(markdown, format_markdown(results) + '\n' + (
                f'\n{format_targets(judged)}\n' if judged else '') + (
                '' if finished else f'\n{i} of {len(jobs)} cases: the run has not finished.\n'))
    if judged:
        log(format_targets(judged))
    return results
