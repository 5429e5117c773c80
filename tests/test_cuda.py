"""The backbones on a CUDA GPU: the CPU's numbers in fp32, forward and backward, padded maps and
gradient checkpointing included; autocast close to fp32; the peer comparison on the GPU.

The GPU tests are skipped where torch sees no CUDA device, as on the CI machines;
docs/benchmarks_history.md says where they last ran (`python -m pytest tests/test_cuda.py` on a GPU
machine). The autocast training check also runs on the CPU (bf16), everywhere.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from mmtwins.analysis.peers import (CATEGORY_NAMES, available_peers, compare_case, exact_fp32,
                                    randomize_parameters_)
from mmtwins.models import PCPVT, SVT

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')

# 224x224: every stage map is whole 7x7 LSA windows. 200x263: the maps (50x66, 25x33, 13x17,
# 7x9) are padded at the bottom and right in stages 1-3 and at the right only in stage 4, so
# the LSA key mask is exercised both ways.
SHAPES = [(2, 3, 224, 224), (1, 3, 200, 263)]
# A loss scale as mixed-precision training uses (mmengine's AmpOptimWrapper): the gradients of a
# mean over ~10^5 map elements would otherwise be fp16 subnormals.
LOSS_SCALE = 2.**12


def _model(cls):
    torch.manual_seed(0)
    return randomize_parameters_(cls(arch='small'))


def _step(model, x, amp_dtype=None):
    """Stage maps and every parameter's gradient of one training step on ``x``'s device."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
        outs = model.train()(x)
    # A weighting per channel, so a gradient that lands on the wrong channel shows.
    loss = sum((o.float() * torch.linspace(-1, 1, o.shape[1], device=x.device)[:, None, None])
               .mean() for o in outs)
    (loss * LOSS_SCALE).backward()
    return [o.detach().float().cpu() for o in outs], {
        n: p.grad.float().cpu() / LOSS_SCALE for n, p in model.named_parameters()}


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@requires_cuda
@pytest.mark.parametrize('shape', SHAPES, ids=['whole-windows', 'padded'])
@pytest.mark.parametrize('cls', [PCPVT, SVT])
def test_fp32_forward_and_backward_on_gpu_match_the_cpu(cls, shape):
    cpu = _model(cls)
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(*shape)
    ref_outs, ref_grads = _step(cpu, x)
    with exact_fp32():
        outs, grads = _step(gpu, x.cuda())
    for o, r in zip(outs, ref_outs):
        assert (o - r).abs().max().item() <= 1e-4
    assert grads.keys() == ref_grads.keys()
    worst = max(grads, key=lambda n: _rel(grads[n], ref_grads[n]))
    assert _rel(grads[worst], ref_grads[worst]) <= 1e-4, worst


@requires_cuda
@pytest.mark.parametrize('cls', [PCPVT, SVT])
def test_with_cp_on_gpu_gives_the_same_gradients(cls):
    plain = _model(cls).cuda()
    cp = copy.deepcopy(plain)
    cp.with_cp = True
    x = torch.randn(*SHAPES[1], device='cuda')
    with exact_fp32():
        (outs, grads), (cp_outs, cp_grads) = _step(plain, x), _step(cp, x)
    for a, b in zip(outs, cp_outs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for n in grads:
        assert _rel(cp_grads[n], grads[n]) <= 1e-5, n


@pytest.mark.parametrize('device,dtype', [
    pytest.param('cuda', torch.float16, id='cuda-fp16', marks=requires_cuda),
    pytest.param('cuda', torch.bfloat16, id='cuda-bf16', marks=requires_cuda),
    pytest.param('cpu', torch.bfloat16, id='cpu-bf16')])
@pytest.mark.parametrize('cls', [PCPVT, SVT])
def test_autocast_training_step_is_close_to_fp32(cls, device, dtype):
    model = _model(cls).to(device)
    x = torch.randn(*SHAPES[1], device=device)
    with exact_fp32():
        ref_outs, ref_grads = _step(model, x)
    outs, grads = _step(model, x, amp_dtype=dtype)
    for o, r in zip(outs, ref_outs):
        assert torch.isfinite(o).all()
        assert F.cosine_similarity(o.flatten(), r.flatten(), dim=0) >= 0.999
    flat = torch.cat([g.flatten() for g in grads.values()])
    ref = torch.cat([g.flatten() for g in ref_grads.values()])
    assert torch.isfinite(flat).all()
    assert F.cosine_similarity(flat, ref, dim=0) >= 0.99
    # Each parameter's own gradient too: the large ones dominate the cosine above, where a wrong
    # gradient of a bias or a norm would not show. (CPU bf16: 0.97 at worst, a LayerNorm bias.)
    cosine = {n: F.cosine_similarity(grads[n].flatten(), ref_grads[n].flatten(), dim=0).item()
              for n in grads}
    worst = min(cosine, key=cosine.get)
    assert cosine[worst] >= 0.9, (worst, cosine[worst])


@requires_cuda
def test_peer_comparison_on_gpu_checks_agreement_there_and_profiles_kernels():
    peers = available_peers()
    assert peers, 'no peer implementation importable'
    res = compare_case('svt', 'small', 'train', (1, 3, 64, 64), peers=peers, device='cuda',
                       amp=True, warmup=2, repeats=2, kernels=True, log=lambda line: None)
    assert res.precision == 'amp-fp16' and 0.99 <= res.cosine <= 1.001
    assert set(res.device_max_abs_diff) == set(peers)
    assert all(d <= 1e-4 for d in res.device_max_abs_diff.values())
    assert set(res.seconds) == {'mmtwins', *peers} and all(t > 0 for t in res.seconds.values())
    assert all(m > 0 for m in res.peak_mb.values())
    assert set(res.kernels) == set(res.seconds)
    for k in res.kernels.values():
        assert list(k['ms']) == [*CATEGORY_NAMES, 'total']
        assert 0 < k['ms']['total'] <= k['wall_ms']  # GPU busy time within the step's wall time
    # the kernels of the linears and of the fused attention are found through their operators
    ours = res.kernels['mmtwins']
    assert ours['ms']['matmul'] > 0 and ours['ms']['fused attention'] > 0
    assert ours['matmul_gflops'] > 0
