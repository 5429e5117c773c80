"""One-off A/B on the GPU: mmtwins' training step with its lean MLP function against the plain
autograd composition of the same modules, alternated step by step in one process."""
import statistics
import time

import torch

from mmtwins.analysis.peers import build_impl, make_step
from mmtwins.models.layers import mlp as M


def plain(self, x, norm=None):
    return self.fc2(self.act(self.fc1(x if norm is None else norm(x))))


forwards = {'lean': M.Mlp.forward, 'plain': plain}
for fam in ('pcpvt', 'svt'):
    for amp in (False, True):
        torch.manual_seed(0)
        model = build_impl('mmtwins', fam, 'small').cuda()
        x = torch.randn(2, 3, 512, 512, device='cuda')
        step = make_step(model, x, 'train', amp=amp)
        times = {k: [] for k in forwards}
        peak = {}
        for i in range(25):
            for name in (list(forwards) if i % 2 else list(forwards)[::-1]):
                M.Mlp.forward = forwards[name]
                torch.cuda.synchronize()
                if i == 0:
                    torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                step()
                torch.cuda.synchronize()
                if i == 0:
                    peak[name] = torch.cuda.max_memory_allocated() / 2**20
                if i >= 5:
                    times[name].append((time.perf_counter() - t) * 1e3)
        M.Mlp.forward = forwards['lean']
        print(fam, 'amp-fp16' if amp else 'fp32', ', '.join(
            f'{k} {statistics.median(v):.1f} ms (min {min(v):.1f}, peak {peak[k]:.0f} MB)'
            for k, v in times.items()), flush=True)
