"""The CPU linears through oneDNN (mmtwins/models/layers/linear.py): the route is taken where it
should be (fp32; bf16 where this CPU computes it natively without AMX), gives F.linear's values
and gradients, and leaves every other case alone."""
import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from mmtwins.analysis.peers import dense_gflops, kernel_breakdown
from mmtwins.models import SVT
from mmtwins.models.layers import LocallyGroupedAttention, Mlp, linear as linear_module
from mmtwins.models.layers.linear import (ChunkProducts, apply_linear, linear, linear_grads,
                                         use_onednn)
from probes import analysis_tool

ONEDNN_OPS = {'aten::mkldnn_convolution', 'aten::convolution_backward'}
#: The chunked MLP's forward products (:class:`ChunkProducts`) and their backward.
MLP_ONEDNN_OPS = {'mkldnn::_convolution_pointwise', 'aten::convolution_backward'}
BLAS_OPS = {'aten::addmm', 'aten::addmm_', 'aten::mm'}

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason='this PyTorch build has no oneDNN')


@pytest.fixture(autouse=True)
def route_on(monkeypatch):
    """The route on, as on x86-64 (where it is on by default), and two threads: PyTorch takes
    oneDNN for fp32 convolutions with more than one thread only (and the route keeps that bound
    for bf16 too)."""
    monkeypatch.setattr(linear_module, 'USE_ONEDNN', True)
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


def _with_grads(fn, *tensors, grad: str = 'weighted'):
    """``fn(*tensors)`` and the gradients of its weighted sum (or of its plain sum, whose
    gradient is a stride-0 expanded tensor) with respect to ``tensors``."""
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    y = fn(*tensors)
    if grad == 'sum':
        y.sum().backward()
    else:
        y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
    return [y.detach()] + [t.grad for t in tensors]


@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('layout', ['3-D', '2-D', 'transposed', 'stride-0 gradient'])
def test_linear_is_f_linear_through_onednn_values_and_gradients(layout, bias):
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 700, 48), torch.randn(96, 48) / 7, torch.randn(96) if bias else None
    if layout == '2-D':
        x = x.view(-1, 48)
    elif layout == 'transposed':  # (2, 700, 48) with the token dim innermost in memory
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert use_onednn(x, w)
    grad = 'sum' if layout == 'stride-0 gradient' else 'weighted'
    tensors = (x, w) if b is None else (x, w, b)
    got = _with_grads(lambda *t: linear(*t), *tensors, grad=grad)
    _assert_close(got, _with_grads(lambda *t: F.linear(*t), *tensors, grad=grad))
    assert linear(x, w, b).shape == (*x.shape[:-1], 96)
    ops = _profiled_ops(lambda: _with_grads(lambda *t: linear(*t), *tensors, grad=grad))
    assert ONEDNN_OPS <= ops and not ops & BLAS_OPS


def _saved_numel(fn) -> int:
    """Elements of the tensors autograd keeps for backward while ``fn()`` runs."""
    numel = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: numel.append(t.numel()) or t,
                                                  lambda t: t):
        fn()
    return sum(numel)


def test_linear_keeps_for_backward_what_f_linear_keeps():
    """Its input only where the weight needs a gradient; frozen projections keep no activations."""
    x = torch.randn(2, 700, 48, requires_grad=True)
    for w in (torch.randn(96, 48, requires_grad=True), torch.randn(96, 48)):
        assert _saved_numel(lambda: linear(x, w)) == _saved_numel(lambda: F.linear(x, w))
        _assert_close(_with_grads(lambda t: linear(t, w), x),
                      _with_grads(lambda t: F.linear(t, w), x))


def test_linear_grads_are_the_backward_of_linear():
    torch.manual_seed(0)
    g, x, w = torch.randn(1500, 32), torch.randn(1500, 24), torch.randn(32, 24)
    gx, gw, gb = linear_grads(g, x, w, (True, True, True))
    torch.testing.assert_close(gx, g @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, g.t() @ x, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gb, g.sum(0), rtol=1e-5, atol=1e-4)
    assert linear_grads(g, x, w, (False, True, False))[::2] == (None, None)
    for given in (x, None):  # the input gradient alone: from x's shape, or without x
        gx, gw, gb = linear_grads(g, given, w, (True, False, False))
        torch.testing.assert_close(gx, g @ w, rtol=1e-5, atol=1e-5)
        assert gw is None and gb is None
    gx_t, _, _ = linear_grads(g.t().contiguous().t(), x, w, (True, False, False))  # columns
    torch.testing.assert_close(gx_t, gx)


@pytest.mark.parametrize('case', ['fp64', 'bf16 autocast, no native bf16', 'bf16, no native bf16',
                                  'fp16 autocast', 'small', 'one thread', 'switched off',
                                  'oneDNN disabled', 'compiling', 'tracing'])
def test_linear_is_f_linear_itself_where_the_route_does_not_apply(case, monkeypatch):
    x, w = torch.randn(2, 700, 48), torch.randn(96, 48)
    context = contextlib.nullcontext()
    if case == 'fp64':
        x, w = x.double(), w.double()
    elif case.startswith('bf16'):
        monkeypatch.setattr(linear_module, 'ONEDNN_BF16', False)
        if 'autocast' in case:
            context = torch.autocast('cpu', dtype=torch.bfloat16)
        else:
            x, w = x.bfloat16(), w.bfloat16()
    elif case == 'fp16 autocast':
        context = torch.autocast('cpu', dtype=torch.float16)
    elif case == 'small':
        x = x[:, :200]  # 2 * 200 * 48 = 19200 input elements: PyTorch would not take oneDNN
    elif case == 'one thread':
        torch.set_num_threads(1)
    elif case == 'switched off':
        monkeypatch.setattr(linear_module, 'USE_ONEDNN', False)
    elif case == 'oneDNN disabled':
        context = torch.backends.mkldnn.flags(enabled=False)
    elif case == 'compiling':  # torch.compile's inductor picks its own kernels for a linear
        monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    with context:
        if case == 'tracing':  # an exported graph keeps its linear
            graph = torch.jit.trace(lambda t: linear(t, w), x).graph
            assert 'aten::linear' in str(graph) and 'convolution' not in str(graph)
            return
        assert not use_onednn(x, w)
        ops = _profiled_ops(lambda: linear(x, w))
    assert not ops & ONEDNN_OPS


def _assert_bf16_close(got, want):
    """Equal to bf16 rounding: both compute in bf16 with fp32 sums, rounded once more or less."""
    for g, r in zip(got, want, strict=True):
        assert g.dtype == r.dtype
        assert (g.float() - r.float()).abs().max() <= 2e-2 * r.float().abs().max()


@pytest.mark.parametrize('case', ['bf16 tensors', 'fp32 under autocast'])
def test_bf16_products_take_the_route_on_a_cpu_with_native_bf16(case, monkeypatch):
    monkeypatch.setattr(linear_module, 'ONEDNN_BF16', True)
    torch.manual_seed(0)
    tensors = torch.randn(2, 700, 48), torch.randn(96, 48) / 7, torch.randn(96)
    context = contextlib.nullcontext
    if case == 'bf16 tensors':
        tensors = [t.bfloat16() for t in tensors]
    else:
        context = functools.partial(torch.autocast, 'cpu', dtype=torch.bfloat16)
    with context():
        assert linear_module.onednn_dtype(*tensors[:2]) == torch.bfloat16
        got = _with_grads(lambda *t: linear(*t), *tensors)
        ops = _profiled_ops(lambda: _with_grads(lambda *t: linear(*t), *tensors))
        want = _with_grads(lambda *t: F.linear(*t), *tensors)
    # output bf16; gradients in each operand's dtype, as autocast's casts give them
    assert got[0].dtype == torch.bfloat16
    assert [g.dtype for g in got[1:]] == [t.dtype for t in tensors]
    _assert_bf16_close(got, want)
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():  # else PyTorch's own bf16 convolution
        assert ONEDNN_OPS <= ops and not ops & BLAS_OPS


@pytest.mark.parametrize('chunk_rows', [None, 1024])  # 1 chunk; 2 of 1024 rows
def test_chunked_mlp_under_bf16_autocast_through_onednn_matches_the_blas_path(chunk_rows,
                                                                             monkeypatch):
    monkeypatch.setattr(linear_module, 'ONEDNN_BF16', True)
    torch.manual_seed(0)
    mlp, norm = Mlp(32, 128, chunk_rows=chunk_rows), torch.nn.LayerNorm(32)
    x = torch.randn(2, 1024, 32, requires_grad=True)
    params = [p for m in (mlp, norm) for p in m.parameters()]

    def run():
        xg = x.detach().clone().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = mlp(xg, norm=norm)
        y.float().backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
        grads = [xg.grad] + [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return [y.detach()] + grads

    ops = _profiled_ops(run)
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert MLP_ONEDNN_OPS <= ops and not ops & BLAS_OPS
    got = run()
    assert [g.dtype for g in got] == [torch.bfloat16] + [torch.float32] * (1 + len(params))
    monkeypatch.setattr(linear_module, 'USE_ONEDNN', False)
    _assert_bf16_close(got, run())


@pytest.mark.parametrize('avx512_bf16, amx, expected', [(True, False, True), (True, True, False),
                                                         (False, False, False)])
def test_bf16_routes_are_for_cpus_with_avx512_bf16_and_without_amx(monkeypatch, avx512_bf16, amx,
                                                                   expected):
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: amx)
    assert linear_module.bf16_without_amx() is expected
    monkeypatch.delattr(torch.cpu, '_is_amx_tile_supported')  # a PyTorch without the probe
    assert linear_module.bf16_without_amx() is False


def test_apply_linear_calls_the_layer_unless_it_takes_the_route(monkeypatch):
    """A plain ``nn.Linear`` that takes the route is not called (its weights are read); any other
    layer, or any input the route does not take, calls the layer itself: its hooks, a replaced
    forward, quantisation and the module's scope in a traced graph all stay."""
    x = torch.randn(2, 700, 48)
    layer = torch.nn.Linear(48, 96)
    calls = []
    forward = torch.nn.Linear.forward
    monkeypatch.setattr(torch.nn.Linear, 'forward',
                        lambda self, t: calls.append('class') or forward(self, t))
    ops = _profiled_ops(lambda: apply_linear(layer, x))
    assert ONEDNN_OPS & ops and not BLAS_OPS & ops and calls == []
    apply_linear(layer.double(), x.double())  # fp64: not the route
    assert calls == ['class']
    layer.float()
    calls.clear()
    handle = layer.register_forward_hook(lambda *args: calls.append('hook'))
    with torch.no_grad():
        torch.testing.assert_close(apply_linear(layer, x), F.linear(x, layer.weight, layer.bias))
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda *args: calls.append('global hook'))
    apply_linear(layer, x)
    handle.remove()
    layer.forward = lambda t: calls.append('own forward') or forward(layer, t)
    apply_linear(layer, x)
    del layer.forward
    assert calls == ['class', 'hook', 'class', 'global hook', 'own forward']
    quantised, = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(layer),
                                                        {torch.nn.Linear})
    with torch.no_grad():
        y = apply_linear(quantised, x)
    assert F.cosine_similarity(y.flatten(), layer(x).detach().flatten(), 0) > 0.99


@pytest.mark.parametrize('needs', ['all', 'frozen weights', 'no input gradient'])
@pytest.mark.parametrize('recompute_hidden', [False, True])
@pytest.mark.parametrize('chunk_rows', [None, 1024])  # 1 chunk; 2 of 1024 rows
def test_chunked_mlp_through_onednn_matches_the_blas_path(chunk_rows, recompute_hidden, needs,
                                                          monkeypatch):
    torch.manual_seed(0)
    mlp = Mlp(32, 128, chunk_rows=chunk_rows, recompute_hidden=recompute_hidden)
    norm = torch.nn.LayerNorm(32)
    x = torch.randn(2, 1024, 32, requires_grad=needs != 'no input gradient')
    if needs == 'frozen weights':
        mlp.requires_grad_(False)
    params = [p for m in (mlp, norm) for p in m.parameters() if p.requires_grad]

    def run():
        xg = x.detach().clone().requires_grad_(x.requires_grad)
        y = mlp(xg, norm=norm)
        y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
        grads = [xg.grad] if x.requires_grad else []
        grads += [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return [y.detach()] + grads

    ops = _profiled_ops(run)
    # every input gradient, frozen weights' too, by oneDNN's backward from the weight as it is,
    # not a forward convolution with a transposed copy of it (one recomputes h, though)
    forbidden = BLAS_OPS | (set() if recompute_hidden else {'aten::mkldnn_convolution'})
    assert MLP_ONEDNN_OPS <= ops and not ops & forbidden
    got = run()
    monkeypatch.setattr(linear_module, 'USE_ONEDNN', False)
    _assert_close(got, run())


def _op_calls(fn, name: str) -> int:
    """How many times ``fn()`` calls the operator ``name``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name == name for e in prof.events())


REORDER = 'aten::mkldnn_reorder_conv2d_weight'


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_chunk_products_reorder_the_weight_once_and_give_linears_values(dtype, monkeypatch):
    """Row blocks through oneDNN with the weight reordered once (for the blocks of the first
    one's rows) give :func:`linear`'s values bit for bit (the same kernel, its weight reordered
    ahead), into ``out`` too; the fused GELU gives ``F.gelu``'s to the dtype's rounding. A block
    off the route (fp64) takes ``F.linear``."""
    monkeypatch.setattr(linear_module, 'ONEDNN_BF16', True)
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip('this CPU has no native bf16 for oneDNN')
    torch.manual_seed(0)
    x, w, b = (t.to(dtype) for t in (torch.randn(3000, 48), torch.randn(96, 48) / 7,
                                     torch.randn(96)))
    blocks = x.split(1024)  # the last one shorter
    packed = []  # per product, whether its weight was the reordered one
    product = torch.ops.mkldnn._convolution_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, '_convolution_pointwise',
                        lambda x, w, *args: packed.append(w.is_mkldnn) or product(x, w, *args))
    for pack, reorders in [(True, 1), (False, 0)]:
        products = ChunkProducts(w, b, pack=pack)
        packed.clear()
        with torch.no_grad():
            got = [products(t) for t in blocks]
            # oneDNN may want another layout for the shorter block: it takes the plain weight
            assert packed == [pack, pack, False]
            assert _op_calls(lambda: [products(t) for t in blocks], REORDER) == 0
            for t, y in zip(blocks, got, strict=True):
                assert torch.equal(y, linear(t, w, b))
                out = torch.empty_like(y)
                assert products(t, out=out) is out and torch.equal(out, y)
                gelu, want = products(t, gelu=True), F.gelu(y.float())
                assert gelu.dtype == dtype
                tol = 1e-5 if dtype == torch.float32 else 1e-2
                assert (gelu.float() - want).abs().max() <= tol * want.abs().max()
        assert _op_calls(lambda: ChunkProducts(w, b, pack)(blocks[0]), REORDER) == reorders
    x64, w64 = blocks[0].double(), w.double()
    products, out = ChunkProducts(w64, None, pack=True), torch.empty(1024, 96, dtype=torch.float64)
    assert not use_onednn(x64, w64)
    assert products(x64, out=out) is out
    torch.testing.assert_close(out, F.linear(x64, w64))
    torch.testing.assert_close(products(x64, gelu=True), F.gelu(F.linear(x64, w64)))


@pytest.mark.parametrize('autocast', [False, True], ids=['fp32', 'bf16 autocast'])
@pytest.mark.parametrize('chunk_rows', [None, 1024])  # 1 chunk; 2 of 1024 rows
def test_chunked_mlp_inference_fuses_its_gelu_into_onednn(chunk_rows, autocast, monkeypatch):
    """In inference the MLP's GELU is a post-op of ``fc1``'s oneDNN product (no GELU of its
    own) and several chunks reorder each weight once; the values are the BLAS path's."""
    monkeypatch.setattr(linear_module, 'ONEDNN_BF16', True)
    if autocast and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip('this CPU has no native bf16 for oneDNN')
    torch.manual_seed(0)
    mlp, norm = Mlp(32, 128, chunk_rows=chunk_rows), torch.nn.LayerNorm(32)
    x = torch.randn(2, 1024, 32)

    @torch.no_grad()
    def run():
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            return mlp(x, norm=norm)

    ops = _profiled_ops(run)
    assert 'mkldnn::_convolution_pointwise' in ops and not ops & BLAS_OPS
    assert 'aten::gelu' not in ops
    assert _op_calls(run, REORDER) == (0 if chunk_rows is None else 2)
    got = run()
    monkeypatch.setattr(linear_module, 'USE_ONEDNN', False)
    if autocast:
        _assert_bf16_close([got], [run()])
    else:
        _assert_close([got], [run()])


def test_linear_twice_differentiable_as_f_linear():
    """A gradient penalty differentiates a gradient once more (the attention's fused kernel does
    not allow it on a CPU, but a linear does, through either route)."""
    torch.manual_seed(0)
    x, w, b = torch.randn(1000, 48), torch.randn(96, 48) / 7, torch.randn(96)

    def penalty(fn):
        xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
        gx, = torch.autograd.grad(fn(xg, wg, bg).square().sum(), xg, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (wg, bg), allow_unused=True)[:1]

    ops = _profiled_ops(lambda: penalty(linear))
    assert ONEDNN_OPS <= ops and not ops & BLAS_OPS
    _assert_close(penalty(linear), penalty(F.linear))


@pytest.mark.parametrize('frozen', [False, True])
def test_kernel_breakdown_counts_the_onednn_linears_as_matmuls(frozen):
    x = torch.randn(4000, 32, requires_grad=True)
    w = torch.randn(64, 32, requires_grad=not frozen)
    k = kernel_breakdown(lambda: linear(x, w).sum().backward())
    assert k['ms']['matmul'] > 0 and k['ms']['convolution'] == 0
    products = 2 if frozen else 3  # forward, input gradient, weight gradient
    flops = 2 * 4000 * 32 * 64 * products
    assert k['matmul_gflops'] == pytest.approx(flops / k['ms']['matmul'] / 1e6)


def test_kernel_breakdown_counts_the_mlps_fused_products_as_matmuls():
    """The inference MLP's products, the GELU fused into the first, are matmuls with their
    FLOPs; packing the weights for oneDNN is a copy, not a convolution."""
    mlp, x = Mlp(32, 128, chunk_rows=1024), torch.randn(2, 1024, 32)
    with torch.no_grad():
        k = kernel_breakdown(lambda: mlp(x))
    assert k['ms']['GELU'] == k['ms']['convolution'] == 0 and k['ms']['copies'] > 0
    flops = 2 * 2048 * 32 * 128 * 2  # fc1 and fc2
    assert k['matmul_gflops'] == pytest.approx(flops / k['ms']['matmul'] / 1e6)


def test_dense_ceiling_measures_each_kernel_the_linears_may_take(monkeypatch):
    rates = dense_gflops(n=256, repeats=2)
    assert set(rates) == {'blas', 'onednn'} and min(rates.values()) > 0
    assert set(dense_gflops(n=256, repeats=2, dtype=torch.float64)) == {'blas'}
    for native, kernels in [(True, {'blas', 'onednn'}), (False, {'blas'})]:
        monkeypatch.setattr(linear_module, 'ONEDNN_BF16', native)
        assert set(dense_gflops(n=256, repeats=2, dtype=torch.bfloat16)) == kernels


def test_linear_ab_tool_prints_both_arms(capsys):
    analysis_tool('linear_ab').main(['--size', '64', '--steps', '6', '--variants', 'svt',
                                     '--batch', '1'])
    line, = capsys.readouterr().out.splitlines()
    assert line.startswith('svt-small train 1x3x64x64 fp32 cpu: onednn ')
    assert ', blas ' in line
