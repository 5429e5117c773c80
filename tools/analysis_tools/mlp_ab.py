"""A/B of the blocks' MLP path in one process: mmtwins' training (or inference) step with its
chunked MLP function against another MLP forward, switched step by step in alternating order.

    python tools/analysis_tools/mlp_ab.py                        # against the plain composition
    python tools/analysis_tools/mlp_ab.py --device cuda --amp    # the same under fp16 autocast
    python tools/analysis_tools/mlp_ab.py --against HEAD~1 --size 64   # against an earlier commit

``--against plain`` (default) runs ``fc2(gelu(fc1(norm(x))))`` through autograd, which keeps the
normalised tokens and ``gelu(h)`` for backward; a git revision runs that revision's
``mmtwins/models/layers/mlp.py``. Prints the median step time (ms) of each, after 5 warm-up
steps, and each one's peak memory in its first step (on a GPU; peak RSS is not separable here).
"""
import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mmtwins.analysis.peers import build_impl, make_step
from mmtwins.models.layers import mlp as M

ROOT = Path(__file__).resolve().parents[2]
MLP_PATH = 'mmtwins/models/layers/mlp.py'


def plain(self, x, norm=None):
    """The MLP as autograd would run it unchanged."""
    return self.fc2(self.act(self.fc1(x if norm is None else norm(x))))


def forward_at(rev: str):
    """``Mlp.forward`` of ``mlp.py`` as it is at git revision ``rev``."""
    src = subprocess.run(['git', 'show', f'{rev}:{MLP_PATH}'], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / 'mlp_at_rev.py'
    path.write_text(src.replace('from .embed import', 'from mmtwins.models.layers.embed import'))
    spec = importlib.util.spec_from_file_location('mlp_at_rev', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Mlp.forward


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--against', default='plain', help="'plain' or a git revision")
    p.add_argument('--device', default='cpu')
    p.add_argument('--size', type=int, default=512, help='input side (batch 2)')
    p.add_argument('--mode', choices=['train', 'infer'], default='train')
    p.add_argument('--amp', action='store_true', help='autocast (fp16 on GPU, bf16 on CPU)')
    p.add_argument('--steps', type=int, default=25, help='steps of each, the first 5 untimed')
    p.add_argument('--variants', nargs='+', default=['pcpvt', 'svt'])
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    dev = torch.device(args.device)
    other = plain if args.against == 'plain' else forward_at(args.against)
    forwards = {'mmtwins': M.Mlp.forward, args.against: other}
    for family in args.variants:
        torch.manual_seed(0)
        model = build_impl('mmtwins', family, 'small').to(dev)
        step = make_step(model, torch.randn(2, 3, args.size, args.size, device=dev), args.mode,
                         amp=args.amp)
        times, peak = {k: [] for k in forwards}, {}
        try:
            for i in range(args.steps):
                for name in list(forwards)[::1 if i % 2 else -1]:
                    M.Mlp.forward = forwards[name]
                    if dev.type == 'cuda':
                        torch.cuda.synchronize(dev)
                        torch.cuda.reset_peak_memory_stats(dev)
                    start = time.perf_counter()
                    step()
                    if dev.type == 'cuda':
                        torch.cuda.synchronize(dev)
                        peak.setdefault(name, torch.cuda.max_memory_allocated(dev) / 2**20)
                    if i >= 5:
                        times[name].append((time.perf_counter() - start) * 1e3)
        finally:
            M.Mlp.forward = forwards['mmtwins']
        print(f'{family}-small {args.mode} 2x3x{args.size}x{args.size} '
              f'{"amp" if args.amp else "fp32"} {args.device}: ' + ', '.join(
                  f'{n} {statistics.median(t):.1f} ms (min {min(t):.1f}'
                  + (f', first-step peak {peak[n]:.0f} MB)' if n in peak else ')')
                  for n, t in times.items()), flush=True)


if __name__ == '__main__':
    sys.exit(main())
