"""mmtwins side by side with the peer implementations of the same backbones.

Peers: timm (``twins_*``), mmsegmentation 1.x and mmpretrain 1.x (``PCPVT``/``SVT``). Every
implementation is built for the same variant without stage-end norms, so all four compute the
same function on maps of whole LSA windows; mmtwins is loaded with each peer's weights (through
its own checkpoint loader) and must reproduce that peer's four stage maps at 224x224 before
anything is timed. Timings are interleaved
(implementations take turns in rotating order) and the median of the repeats is reported.

Memory, two measures:

* ``saved_mb``: bytes of the tensors autograd keeps for the backward pass of one training step
  (unique storages, counted with ``torch.autograd.graph.saved_tensors_hooks``): deterministic.
* ``peak_mb``: the increase of the peak resident set size over the process's size before the
  step, measured in a fresh process per implementation (so no allocator cache of another run
  leaks in); what a user sees, though noisier.
"""
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from mmtwins.checkpoint import load_twins_checkpoint
from mmtwins.models import PCPVT, SVT
from .benchmark import PeakMemory, autocast_context

FAMILIES = {'pcpvt': PCPVT, 'svt': SVT}
PEERS = ('timm', 'mmseg', 'mmpretrain')
SPEC_KEYS = ('embed_dims', 'num_heads', 'mlp_ratios', 'depths', 'sr_ratios')


class _TimmStages(nn.Module):
    """timm's model returning its four stage maps (no final norm), like the others."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return tuple(self.model.forward_intermediates(x, intermediates_only=True))


def build_impl(impl: str, family: str, arch: str, **kwargs) -> nn.Module:
    """One implementation of ``family``-``arch`` returning the four stage maps (NCHW).

    ``kwargs`` go to mmtwins' constructor only (e.g. ``with_cp=True``).
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
        model = getattr(twins, cls.__name__)(**spec, qkv_bias=True, norm_after_stage=False)
    elif impl == 'mmpretrain':
        from mmpretrain.models.backbones import twins
        spec.update(patch_sizes=[4, 2, 2, 2], strides=[4, 2, 2, 2])
        if family == 'svt':
            spec['window_sizes'] = s['window_sizes']
        model = getattr(twins, cls.__name__)(arch=spec, out_indices=(0, 1, 2, 3), qkv_bias=True,
                                             norm_after_stage=False)
    else:
        raise ValueError(f'unknown implementation {impl!r}; choose mmtwins or one of {PEERS}')
    model.init_weights()
    return model


def available_peers() -> List[str]:
    """The peers whose package imports here."""
    import importlib.util
    names = {'timm': 'timm', 'mmseg': 'mmseg', 'mmpretrain': 'mmpretrain'}
    return [p for p in PEERS if importlib.util.find_spec(names[p]) is not None]


def max_abs_diff_with_peer(peer: nn.Module, family: str, arch: str, x: torch.Tensor) -> float:
    """Load ``peer``'s weights into a fresh mmtwins model; max |difference| of the stage maps."""
    ours = build_impl('mmtwins', family, arch).eval()
    sd = peer.model.state_dict() if isinstance(peer, _TimmStages) else peer.state_dict()
    load_twins_checkpoint(ours, sd, logger='silent')
    with torch.inference_mode():
        return max((a - b).abs().max().item() for a, b in zip(ours(x), peer.eval()(x)))


# --------------------------------------------------------------------------- one step
def make_step(model: nn.Module, x: torch.Tensor, mode: str, amp: bool = False) -> Callable:
    """A closure running one inference pass (``mode='infer'``) or training step (``'train'``)."""
    device = x.device

    def infer():
        with torch.inference_mode(), autocast_context(device, amp)[0]:
            model(x)

    def train():
        with autocast_context(device, amp)[0]:
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


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def interleaved_times(steps: Dict[str, Callable], device, warmup: int, repeats: int
                      ) -> Dict[str, List[float]]:
    """Seconds per call of each step, taking turns in rotating order."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    _sync(device)
    times = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            steps[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


# --------------------------------------------------------------------------- peak memory
_PEAK_SNIPPET = '''
import json, sys, torch
from mmtwins.analysis.peers import build_impl, make_step
from mmtwins.analysis.benchmark import PeakMemory
impl, family, arch, mode, shape, kw = json.loads(sys.argv[1])
torch.manual_seed(0)
model = build_impl(impl, family, arch, **kw)
x = torch.randn(*shape)
step = make_step(model, x, mode)
with PeakMemory(torch.device('cpu')) as base:
    pass
with PeakMemory(torch.device('cpu')) as peak:
    step()
print(json.dumps(dict(peak_mb=peak.mb - base.mb, kind=peak.kind)))
'''


def peak_memory_mb(impl: str, family: str, arch: str, mode: str, shape: Sequence[int],
                   **kwargs) -> Optional[float]:
    """Peak RSS increase of one step of ``impl`` in a fresh CPU process (None if unmeasurable)."""
    arg = json.dumps([impl, family, arch, mode, list(shape), kwargs])
    res = subprocess.run([sys.executable, '-c', _PEAK_SNIPPET, arg], capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise RuntimeError(f'peak-memory run of {impl} failed:\n{res.stderr[-2000:]}')
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return out['peak_mb'] if out['kind'] == 'process peak RSS' else None


# --------------------------------------------------------------------------- the comparison
@dataclass
class CaseResult:
    """One (variant, mode, input) case: per implementation, median seconds and memory."""
    variant: str
    mode: str
    shape: List[int]
    precision: str
    seconds: Dict[str, float] = field(default_factory=dict)
    saved_mb: Dict[str, float] = field(default_factory=dict)
    peak_mb: Dict[str, Optional[float]] = field(default_factory=dict)
    max_abs_diff: Dict[str, float] = field(default_factory=dict)
    cosine: Optional[float] = None  # autocast cases: output cosine similarity with fp32

    def speedup(self) -> Optional[float]:
        """Fastest peer's median time over mmtwins' (> 1: mmtwins is faster); for an autocast
        case, mmtwins' fp32 time over its autocast time."""
        peers = [t for n, t in self.seconds.items() if n != 'mmtwins']
        return min(peers) / self.seconds['mmtwins'] if peers else None

    def memory_ratio(self, kind: str = 'saved_mb') -> Optional[float]:
        """mmtwins' memory over the leanest peer's (< 1: mmtwins is leaner)."""
        mem = getattr(self, kind)
        peers = [m for n, m in mem.items() if n != 'mmtwins' and m]
        return mem['mmtwins'] / min(peers) if peers and mem.get('mmtwins') else None


def compare_case(family: str, arch: str, mode: str, shape: Sequence[int], peers: Sequence[str],
                 device: str = 'cpu', amp: bool = False, warmup: int = 2, repeats: int = 5,
                 memory: bool = True, tol: float = 1e-4, log=print) -> CaseResult:
    """Check agreement with every peer, then time (and measure memory of) one case."""
    dev = torch.device(device)
    torch.manual_seed(0)
    x = torch.randn(*shape, device=dev)
    impls = {'mmtwins': build_impl('mmtwins', family, arch).to(dev)}
    impls.update({p: build_impl(p, family, arch).to(dev) for p in peers})
    res = CaseResult(f'{family}-{arch}', mode, list(shape), autocast_context(dev, amp)[1])
    # Agreement at 224x224, where every stage map is whole LSA windows: on padded maps the peers
    # differ from mmtwins by design (timm does not mask padded keys; mmseg's and mmpretrain's
    # mask switches off when only one side is padded).
    check = torch.randn(1, 3, 224, 224)
    for p in peers:
        res.max_abs_diff[p] = diff = max_abs_diff_with_peer(impls[p].cpu(), family, arch, check)
        impls[p].to(dev)
        if diff > tol:
            raise AssertionError(f'mmtwins disagrees with {p} on {family}-{arch}: max abs '
                                 f'difference {diff:.3g} > {tol}')
    if amp:  # bf16/fp16 autocast against mmtwins' own fp32, the same model
        steps = {'mmtwins': make_step(impls['mmtwins'], x, mode, amp=True),
                 'mmtwins-fp32': make_step(impls['mmtwins'], x, mode, amp=False)}
        res.cosine = autocast_cosine(impls['mmtwins'], x)
    else:
        steps = {n: make_step(m, x, mode) for n, m in impls.items()}
    times = interleaved_times(steps, dev, warmup, repeats)
    res.seconds = {n: statistics.median(t) for n, t in times.items()}
    if mode == 'train' and not amp:
        res.saved_mb = {n: saved_tensor_mb(m, x) for n, m in impls.items()}
        if memory and dev.type == 'cpu':
            res.peak_mb = {n: peak_memory_mb(n, family, arch, mode, shape) for n in impls}
    log(format_case(res))
    return res


def autocast_cosine(model: nn.Module, x: torch.Tensor) -> float:
    """Cosine similarity of the concatenated stage maps under autocast and in fp32."""
    model.eval()
    with torch.inference_mode():
        ref = torch.cat([o.flatten() for o in model(x)])
        with autocast_context(x.device, True)[0]:
            low = torch.cat([o.float().flatten() for o in model(x)])
    return torch.nn.functional.cosine_similarity(ref, low, dim=0).item()


def matmul_gflops(device: str = 'cpu', n: int = 2048, repeats: int = 5) -> float:
    """Dense fp32 matmul GFLOP/s of this machine (the ceiling for the GFLOP/s fractions)."""
    dev = torch.device(device)
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    a @ b
    _sync(dev)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        _sync(dev)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def format_case(r: CaseResult) -> str:
    cols = ', '.join(f'{n} {t * 1e3:.0f} ms' for n, t in r.seconds.items())
    if r.cosine is not None:
        cols += f' (cosine similarity with fp32 {r.cosine:.5f})'
    line = (f'{r.variant:>10} {r.mode:<5} {"x".join(map(str, r.shape)):<14} {r.precision:<8} '
            f'{cols}; speed-up vs fastest peer {r.speedup() or float("nan"):.2f}x')
    if r.saved_mb:
        line += (f'; saved-for-backward MB ' +
                 ', '.join(f'{n} {m:.0f}' for n, m in r.saved_mb.items()) +
                 f' (ratio {r.memory_ratio() or float("nan"):.2f})')
    if r.peak_mb:
        line += ('; peak RSS MB ' + ', '.join(f'{n} {m:.0f}' if m else f'{n} ?'
                                               for n, m in r.peak_mb.items()) +
                 f' (ratio {r.memory_ratio("peak_mb") or float("nan"):.2f})')
    return line


def to_json(results: List[CaseResult], extra: dict) -> str:
    return json.dumps(dict(extra, cases=[dict(asdict(r), speedup=r.speedup(),
                                              saved_ratio=r.memory_ratio(),
                                              peak_ratio=r.memory_ratio('peak_mb'))
                                         for r in results]), indent=2)
