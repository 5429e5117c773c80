"""The fp32 CPU linears through oneDNN (mmtwins/models/layers/linear.py): the route is taken
where it should be, gives F.linear's values and gradients, and leaves every other case alone."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from mmtwins.analysis.peers import dense_gflops, kernel_breakdown
from mmtwins.models import SVT
from mmtwins.models.layers import Mlp, linear as linear_module
from mmtwins.models.layers.linear import apply_linear, linear, linear_grads, use_onednn
from probes import analysis_tool

ONEDNN_OPS = {'aten::mkldnn_convolution', 'aten::convolution_backward'}


@pytest.fixture(autouse=True)
def two_threads():
    """PyTorch takes oneDNN for these convolutions with more than one thread only."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _profiled_ops(fn) -> set:
    """Names of the operators that spent time of their own in ``fn()``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.self_cpu_time_total > 0}


def _assert_close(got, want):
    """Equal to fp32 rounding: a weight gradient sums over thousands of rows, in an order that
    differs between the two libraries, so each tensor is compared to 2e-5 of its largest value."""
    for g, r in zip(got, want, strict=True):
        assert (g - r).abs().max() <= 2e-5 * r.abs().max() + 1e-6


def _with_grads(fn, *tensors):
    """``fn(*tensors)`` and the gradients of its weighted sum with respect to ``tensors``."""
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    y = fn(*tensors)
    y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
    return [y.detach()] + [t.grad for t in tensors]


def test_linear_is_f_linear_through_onednn_values_and_gradients():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 700, 48), torch.randn(96, 48) / 7, torch.randn(96)
    assert use_onednn(x, w)
    _assert_close(_with_grads(linear, x, w, b), _with_grads(F.linear, x, w, b))
    assert linear(x, w, b).is_contiguous()  # (B, N, O) rows, as F.linear's
    ops = _profiled_ops(lambda: _with_grads(linear, x, w, b))
    assert ONEDNN_OPS <= ops and not ops & {'aten::addmm', 'aten::mm'}


def test_linear_grads_are_the_backward_of_linear():
    torch.manual_seed(0)
    g, x, w = torch.randn(1500, 32), torch.randn(1500, 24), torch.randn(32, 24)
    gx, gw, gb = linear_grads(g, x, w, (True, True, True))
    torch.testing.assert_close(gx, g @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, g.t() @ x, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gb, g.sum(0), rtol=1e-5, atol=1e-4)
    assert linear_grads(g, x, w, (False, True, False))[::2] == (None, None)
    gx_t, _, _ = linear_grads(g.t().contiguous().t(), x, w, (True, False, False))  # columns
    torch.testing.assert_close(gx_t, gx)


@pytest.mark.parametrize('case', ['fp64', 'bf16 autocast', 'small', 'one thread', 'switched off',
                                  'oneDNN disabled', 'tracing'])
def test_linear_is_f_linear_itself_where_the_route_does_not_apply(case, monkeypatch):
    x, w = torch.randn(2, 700, 48), torch.randn(96, 48)
    context = contextlib.nullcontext()
    if case == 'fp64':
        x, w = x.double(), w.double()
    elif case == 'bf16 autocast':
        context = torch.autocast('cpu', dtype=torch.bfloat16)
    elif case == 'small':
        x = x[:, :200]  # 2 * 200 * 48 = 19200 input elements: PyTorch would not take oneDNN
    elif case == 'one thread':
        torch.set_num_threads(1)
    elif case == 'switched off':
        monkeypatch.setattr(linear_module, 'USE_ONEDNN', False)
    elif case == 'oneDNN disabled':
        context = torch.backends.mkldnn.flags(enabled=False)
    with context:
        if case == 'tracing':  # an exported graph keeps its linear
            graph = torch.jit.trace(lambda t: linear(t, w), x).graph
            assert 'aten::linear' in str(graph) and 'convolution' not in str(graph)
            return
        assert not use_onednn(x, w)
        ops = _profiled_ops(lambda: linear(x, w))
    assert not ops & ONEDNN_OPS


def test_apply_linear_calls_a_layer_that_is_not_a_plain_linear():
    x = torch.randn(2, 700, 48)
    layer = torch.nn.Linear(48, 96)
    assert not _profiled_ops(lambda: apply_linear(layer, x)) & {'aten::addmm'}
    calls = []
    handle = layer.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        torch.testing.assert_close(apply_linear(layer, x), F.linear(x, layer.weight, layer.bias))
    handle.remove()
    assert calls == [1]
    quantised = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(layer), {torch.nn.Linear})
    with torch.no_grad():
        y = apply_linear(quantised[0], x)
    assert F.cosine_similarity(y.flatten(), layer(x).detach().flatten(), 0) > 0.99


@pytest.mark.parametrize('recompute_hidden', [False, True])
@pytest.mark.parametrize('chunk_elems', [None, 1 << 17])  # 1 chunk; 2 of 1024 rows
def test_chunked_mlp_through_onednn_matches_the_blas_path(chunk_elems, recompute_hidden,
                                                          monkeypatch):
    torch.manual_seed(0)
    mlp = Mlp(32, 128, chunk_elems=chunk_elems, recompute_hidden=recompute_hidden)
    norm = torch.nn.LayerNorm(32)
    x = torch.randn(2, 1024, 32)
    params = [p for m in (mlp, norm) for p in m.parameters()]

    def run():
        xg = x.clone().requires_grad_()
        y = mlp(xg, norm=norm)
        y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
        grads = [xg.grad] + [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return [y.detach()] + grads

    ops = _profiled_ops(run)
    assert ONEDNN_OPS <= ops and 'aten::addmm' not in ops
    got = run()
    monkeypatch.setattr(linear_module, 'USE_ONEDNN', False)
    _assert_close(got, run())


def test_backbone_through_onednn_matches_the_blas_path_within_1e_4(monkeypatch):
    """The issue's bound for any speed lever: fp32 max abs diff <= 1e-4 against eager."""
    torch.manual_seed(0)
    arch = dict(embed_dims=[32, 64, 96, 128], num_heads=[1, 2, 3, 4], mlp_ratios=[4, 4, 4, 4],
                depths=[1, 1, 2, 1], sr_ratios=[8, 4, 2, 1], window_sizes=[7, 7, 7, 7])
    model = SVT(arch=arch)
    img = torch.randn(2, 3, 128, 128)

    def run():
        outs = model(img)
        sum(o.square().mean() for o in outs).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return [o.detach() for o in outs] + grads

    ops = _profiled_ops(run)
    assert ONEDNN_OPS <= ops
    got = run()
    monkeypatch.setattr(linear_module, 'USE_ONEDNN', False)
    want = run()
    assert max((g - r).abs().max().item() for g, r in zip(got, want)) <= 1e-4


def test_kernel_breakdown_counts_the_onednn_linears_as_matmuls():
    x, w = torch.randn(4000, 32, requires_grad=True), torch.randn(64, 32, requires_grad=True)
    k = kernel_breakdown(lambda: linear(x, w).sum().backward())
    assert k['ms']['matmul'] > 0 and k['ms']['convolution'] == 0
    flops = 2 * 4000 * 32 * 64 * 3  # forward, input and weight gradients
    assert k['matmul_gflops'] == pytest.approx(flops / k['ms']['matmul'] / 1e6)


def test_dense_ceiling_measures_each_kernel_the_linears_may_take():
    assert set(dense_gflops(n=256, repeats=2)) == {'blas', 'onednn'}
    assert set(dense_gflops(n=256, repeats=2, dtype=torch.float64)) == {'blas'}


def test_linear_ab_tool_prints_both_arms(capsys):
    analysis_tool('linear_ab').main(['--size', '64', '--steps', '6', '--variants', 'svt',
                                     '--batch', '1'])
    line, = capsys.readouterr().out.splitlines()
    assert line.startswith('svt-small train 1x3x64x64 fp32 cpu: onednn ')
    assert ', blas ' in line
