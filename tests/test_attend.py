"""``attend``: PyTorch's fused attention, or on CPUs with AVX512-BF16 and no AMX mmtwins'
compiled kernel and its backward (fp32 and bf16), with the same values and gradients."""
import contextlib
import math
import types

import pytest
import torch
import torch.nn.functional as F

from mmtwins.analysis.peers import autocast_cosine
from mmtwins.models import PCPVT, SVT
from mmtwins.models.layers import (GlobalSubsampledAttention, LocallyGroupedAttention, attention,
                                   graph, native)
from mmtwins.models.layers.attention import attend

from conftest import TINY_PCPVT, TINY_SVT

needs_kernel = pytest.mark.skipif(not attention.NATIVE_ATTENTION,
                                  reason='the kernel runs on CPUs with AVX512-BF16, no AMX')


class _Calls(list):
    """Calls of the kernel, and of its backward."""

    def __init__(self):
        super().__init__()
        self.backward = []


@pytest.fixture
def kernel_calls(monkeypatch):
    """The calls of the compiled kernel (their q), which runs as usual; its backward's calls
    (their grad) in ``kernel_calls.backward``."""
    calls = _Calls()
    ext = attention._ext

    def spy(q, *args):
        calls.append(q)
        return ext.attention(q, *args)

    def backward_spy(grad, *args):
        calls.backward.append(grad)
        return ext.attention_backward(grad, *args)

    monkeypatch.setattr(attention, '_ext', types.SimpleNamespace(
        attention=spy, attention_backward=backward_spy))
    return calls


@pytest.fixture
def stand_in(monkeypatch):
    """The kernel's CPU condition on any CPU, its calls recorded (their q) and answered by
    PyTorch's fused CPU kernel (fp32 masks): which path :func:`attend` takes, wherever the tests
    run."""
    calls = []

    def bias(mask):
        return None if mask is None else torch.zeros(mask.shape).masked_fill_(~mask, -math.inf)

    def fake(q, k, v, mask, scale, with_lse=False):
        calls.append(q)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0., False, attn_mask=bias(mask), scale=scale)
        return out, lse if with_lse else None

    def fake_backward(grad, q, k, v, out, lse, mask, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0., False, attn_mask=bias(mask), scale=scale)

    monkeypatch.setattr(attention, 'NATIVE_ATTENTION', True)
    monkeypatch.setattr(native, 'NATIVE_BF16', True)
    monkeypatch.setattr(attention, '_ext', types.SimpleNamespace(
        attention=fake, attention_backward=fake_backward))
    return calls


def fused_ran(fn, *args, **kwargs):
    """(whether ``fn`` called ``F.scaled_dot_product_attention``, its result)."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*a, **kw):
        calls.append(1)
        return sdpa(*a, **kw)

    F.scaled_dot_product_attention = spy
    try:
        out = fn(*args, **kwargs)
    finally:
        F.scaled_dot_product_attention = sdpa
    return bool(calls), out


def qkv(batch=3, heads=2, nq=49, nk=49, d=32, dtype=torch.float32):
    """q, k and v as the layers pass them: views of the packed projections, (B, heads, N, d)
    with the heads and rows strided."""
    torch.manual_seed(0)
    q = torch.randn(batch, nq, 3, heads, d).to(dtype)[:, :, 0].transpose(1, 2)
    kv = torch.randn(batch, nk, 2, heads, d).to(dtype)
    return [q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)]


def exact(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)


def assert_near(out, q, k, v, mask=None):
    """fp32: within 1e-5 of the exact values (fp32 rounding of the sums), or no further off than
    PyTorch's kernel by twice (large scores, whose rounding the exp magnifies); bf16: no further
    off than PyTorch's kernel (which keeps the weights in fp32) by half again, or 0.02."""
    assert_bounded(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                   exact(q, k, v, mask))


def assert_bounded(got, fused, want):
    """``got`` within :func:`assert_near`'s bounds of the exact ``want``, by the error of
    PyTorch's kernel's ``fused``."""
    err = (got.double() - want).abs().max().item()
    fused_err = (fused.double() - want).abs().max().item()
    if got.dtype == torch.float32:
        assert err < max(1e-5, 2 * fused_err)
    else:
        assert err < max(0.02, 1.5 * fused_err)


@needs_kernel
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('d', [16, 32, 48, 64, 80, 96, 112, 128])
@pytest.mark.parametrize('keys', [1, 5, 49, 64, 300])
def test_the_kernel_computes_attention(kernel_calls, dtype, d, keys):
    # keys: one (an odd count: a bf16 pair with padding), part of a register, LSA's windows,
    # whole registers, several tiles and a part
    q, k, v = qkv(nk=keys, d=d, dtype=dtype)
    with torch.inference_mode():
        fused, out = fused_ran(attend, q, k, v)
    assert not fused and len(kernel_calls) == 1
    assert out.shape == q.shape and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous()  # (B, N, heads, d) memory, as the fused kernel's
    assert_near(out, q, k, v)


@needs_kernel
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('queries', [1, 7, 13, 23, 25, 241])
@pytest.mark.parametrize('sharpness', [1, 30])
def test_query_counts_and_peaked_weights(kernel_calls, dtype, queries, sharpness):
    # queries: every remainder of the tiles (8 rows) and blocks (24), a second task (240);
    # sharpness 30: weights far below 2**-126 (flushed to 0) beside one near 1
    q, k, v = qkv(nq=queries, nk=37, dtype=dtype)
    q = q * sharpness
    with torch.inference_mode():
        out = attend(q, k, v)
    assert len(kernel_calls) == 1
    assert_near(out, q, k, v)


@needs_kernel
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('mask_shape', [(3, 1, 1, 49), (3, 2, 49, 49), (1, 2, 1, 49), (49, 49),
                                        (3, 1, 49, 1)],
                         ids=['key mask', 'per query and head', 'per head', '2-D', 'per query'])
def test_masked_keys_get_no_weight(kernel_calls, dtype, mask_shape):
    q, k, v = qkv(dtype=dtype)
    torch.manual_seed(1)
    mask = torch.rand(mask_shape) > 0.3
    if mask_shape[-1] > 1:
        mask[..., 0] = True  # every query keeps a key
    with torch.inference_mode():
        out = attend(q, k, v, mask)
    assert len(kernel_calls) == 1
    attends = mask.expand(3, 2, 49, 49).any(-1)  # 'per query': every key or none (zeros)
    assert attends.any() and out[~attends].eq(0).all()
    # the queries that attend: near the exact values (those that do not: given every key, to
    # compare the others in one tensor)
    full = mask.expand(3, 2, 49, 49) | ~attends[..., None]
    assert_near(torch.where(attends[..., None], out, exact(q, k, v, full).to(out.dtype)),
                q, k, v, full)


@needs_kernel
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
def test_a_query_without_keys_gives_zeros_as_the_fused_kernel(kernel_calls, dtype):
    q, k, v = qkv(dtype=dtype)
    mask = torch.ones(3, 2, 49, 49, dtype=torch.bool)
    mask[1, 0, 5] = False
    with torch.inference_mode():
        out = attend(q, k, v, mask)
        fused = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert len(kernel_calls) == 1
    assert out[1, 0, 5].eq(0).all() and fused[1, 0, 5].eq(0).all()
    assert_near(out[:, :, 6:], q[:, :, 6:], k, v, mask[:, :, 6:])  # the other rows


@needs_kernel
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
def test_a_nan_score_gives_a_nan_row_as_the_fused_kernel(kernel_calls, dtype):
    q, k, v = qkv(dtype=dtype)
    k[1, 0, 7, 3] = math.nan
    with torch.inference_mode():
        out = attend(q, k, v)
        fused = F.scaled_dot_product_attention(q, k, v)
    assert len(kernel_calls) == 1
    assert out[1, 0].isnan().all() and fused[1, 0].isnan().all()
    assert not out[1, 1].isnan().any() and not out[0].isnan().any()


@needs_kernel
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
def test_rows_split_over_tasks_and_threads_give_the_same_values(kernel_calls, dtype):
    # 1000 queries: tasks of 240 rows, blocks of 24, tiles of 8 and their remainders; a mask
    # per query, given with its keys strided (a transpose, made contiguous for the kernel)
    q, k, v = qkv(batch=1, heads=3, nq=1000, nk=37, dtype=dtype)
    torch.manual_seed(1)
    mask = (torch.rand(1, 3, 37, 1000) > 0.3).transpose(2, 3)
    mask[..., 0] = True
    threads = torch.get_num_threads()
    with torch.inference_mode():
        out = attend(q, k, v, mask)
        torch.set_num_threads(1)
        try:
            alone = attend(q, k, v, mask)
        finally:
            torch.set_num_threads(threads)
    torch.testing.assert_close(out, alone, atol=0, rtol=0)
    assert_near(out, q, k, v, mask)


@needs_kernel
def test_contiguous_inputs_and_no_queries(kernel_calls):
    q, k, v = (t.contiguous() for t in qkv(nk=20))
    with torch.inference_mode():
        assert_near(attend(q, k, v), q, k, v)
        assert attend(q[:, :, :0], k, v).shape == (3, 2, 0, 32)
        assert attend(q[:0], k[:0], v[:0]).shape == (0, 2, 49, 32)


@pytest.mark.parametrize('case', [
    'dropout', 'other CPU', 'exporting', 'compiling',
    'fp16', 'fp16 autocast', 'bf16 autocast of fp32', 'float mask', '3-D', '0 channels',
    '24 channels', '144 channels', 'strided channels', 'broadcast keys', 'no keys'])
def test_the_fused_kernel_runs_where_the_kernel_does_not_apply(stand_in, monkeypatch, case):
    q, k, v = qkv(dtype=torch.float16 if case == 'fp16' else torch.float32,
                  d={'0 channels': 0, '24 channels': 24, '144 channels': 144}.get(case, 32),
                  nk=0 if case == 'no keys' else 49)
    dropout = 0.5 if case == 'dropout' else 0.
    mask, context = None, contextlib.nullcontext()
    if case == 'other CPU':
        monkeypatch.setattr(attention, 'NATIVE_ATTENTION', False)
    elif case == 'exporting':
        monkeypatch.setattr(graph, 'is_exporting', lambda: True)
    elif case == 'compiling':
        monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    elif case == 'fp16 autocast':  # the fused kernel computes in fp16 there
        context = torch.autocast('cpu', dtype=torch.float16)
    elif case == 'bf16 autocast of fp32':  # ... and in bf16 here
        context = torch.autocast('cpu', dtype=torch.bfloat16)
    elif case == 'float mask':  # added to the scores
        mask = torch.zeros(3, 1, 1, 49)
    elif case == '3-D':
        q, k, v = q[0], k[0], v[0]
    elif case == 'strided channels':
        q, k, v = (t[..., ::2] for t in (q, k, v))
    elif case == 'broadcast keys':
        k, v = k[:1], v[:1]
    with context:
        fused, out = fused_ran(attend, q, k, v, mask, dropout)
    assert fused and not stand_in and out.shape == q.shape


def test_the_kernel_takes_tensors_with_and_without_gradients(stand_in):
    q, k, v = qkv()
    assert torch.is_grad_enabled() and not fused_ran(attend, q, k, v)[0] and len(stand_in) == 1
    with torch.autocast('cpu', dtype=torch.bfloat16):  # bf16 tensors under bf16 autocast
        attend(*(t.bfloat16() for t in (q, k, v)))
    assert len(stand_in) == 2


def test_a_gradient_takes_the_kernels_forward_and_backward(stand_in):
    q, k, v = (t.requires_grad_() for t in qkv())
    mask = torch.rand(3, 1, 1, 49) > 0.3
    mask[..., 0] = True
    fused, out = fused_ran(attend, q, k, v, mask)
    assert not fused and len(stand_in) == 1 and out.requires_grad
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, mask).sum(), (q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    with pytest.raises(RuntimeError):  # once differentiable, as PyTorch's fused attention
        g, = torch.autograd.grad(attend(q, k, v).sum(), q, create_graph=True)
        g.sum().backward()


def test_the_gate_asks_what_every_kernel_asks(monkeypatch):
    """No gradient, no dispatch mode, plain tensors, not recording: :func:`.native.native_call`
    (its cases are tested with the LayerNorm kernel's)."""
    asked = []
    monkeypatch.setattr(attention, 'NATIVE_ATTENTION', True)
    monkeypatch.setattr(attention, 'native_call', lambda *t, **kw: asked.append(t) or False)
    q, k, v = qkv()
    mask = torch.ones(1, 49, dtype=torch.bool)
    assert fused_ran(attend, q, k, v, mask)[0]
    assert asked == [(q, k, v, mask)]


@needs_kernel
@pytest.mark.parametrize('hw', [(14, 14), (9, 10)], ids=['whole windows', 'padded'])
@pytest.mark.parametrize('cls', [LocallyGroupedAttention, GlobalSubsampledAttention])
def test_attention_layers_in_inference_take_the_kernel(kernel_calls, monkeypatch, cls, hw):
    torch.manual_seed(0)
    layer = (cls(32, 2, window_size=7) if cls is LocallyGroupedAttention
             else cls(32, 2, sr_ratio=2)).eval()
    x = torch.randn(2, hw[0] * hw[1], 32)
    with torch.inference_mode():
        fused, out = fused_ran(layer, x, hw)
        with torch.autocast('cpu', torch.bfloat16):
            bf16 = layer(x, hw)
        assert not fused and len(kernel_calls) == 2
        monkeypatch.setattr(attention, 'NATIVE_ATTENTION', False)
        reference = layer(x, hw)
        exact_out = layer.double()(x.double(), hw)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    assert F.cosine_similarity(bf16.double().flatten(), exact_out.flatten(), 0) > 0.9999


@needs_kernel
@pytest.mark.parametrize('cls,arch', [(SVT, TINY_SVT), (PCPVT, TINY_PCPVT)])
def test_whole_networks_in_inference_take_the_kernel(kernel_calls, monkeypatch, cls, arch):
    """fp32 within 1e-4 of PyTorch's kernel (the issue's bound for every speed lever), bf16
    autocast within cosine 0.999 of fp32; no attention left to PyTorch's kernel."""
    torch.manual_seed(0)
    model = cls(arch=arch).eval()
    x = torch.randn(2, 3, 96, 80)
    with torch.inference_mode():
        fused, outs = fused_ran(model, x)
        assert not fused and kernel_calls
        with torch.autocast('cpu', torch.bfloat16):
            assert not fused_ran(model, x)[0]
        monkeypatch.setattr(attention, 'NATIVE_ATTENTION', False)
        references = model(x)
    for out, reference in zip(outs, references):
        torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)
    assert autocast_cosine(model, x) >= 0.999


def kernel_grads(q, k, v, mask=None, grad=None):
    """The output and (dq, dk, dv) of :func:`attend` at ``grad`` (random if None), the kernel
    asserted to have run both ways."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    if grad is None:
        torch.manual_seed(2)
        grad = torch.randn(q.shape).to(q.dtype)
    fused, out = fused_ran(attend, q, k, v, mask)
    assert not fused and out.requires_grad
    return out, torch.autograd.grad(out, (q, k, v), grad), grad


def assert_grads_near(grads, q, k, v, mask, grad):
    """Each of (dq, dk, dv) of q's dtype and shape and within the bounds of
    :func:`assert_near` of the exact gradients, by PyTorch's fused backward's error."""
    def of(q, k, v, grad):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return torch.autograd.grad(out, (q, k, v), grad)

    exact_grads = of(q.double(), k.double(), v.double(), grad.double())
    for got, fused, want in zip(grads, of(q, k, v, grad), exact_grads):
        assert got.dtype == q.dtype and got.shape == want.shape
        assert_bounded(got, fused, want)


@needs_kernel
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('d', [16, 32, 48, 64, 80, 96, 112, 128])
@pytest.mark.parametrize('keys', [1, 5, 49, 300])
def test_the_backward_computes_the_gradients(kernel_calls, dtype, d, keys):
    # keys: one, part of a register, LSA's windows, several tiles and a part; bf16 tensors
    # widened to fp32, their gradients rounded back
    q, k, v = qkv(nk=keys, d=d, dtype=dtype)
    out, grads, grad = kernel_grads(q, k, v)
    assert len(kernel_calls) == len(kernel_calls.backward) == 1
    # (B, N, heads, d) memory, as the forward's output
    assert all(g.transpose(1, 2).is_contiguous() for g in grads)
    assert_grads_near(grads, q, k, v, None, grad)


@needs_kernel
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('queries', [1, 63, 65, 700])
def test_the_backwards_rows_split_over_blocks_and_tasks(kernel_calls, dtype, queries):
    # one head: its rows split into chunks of whole 64-row blocks, each summing its own dk
    # and dv, on every thread count; sharp weights (some below 2**-126) among them
    q, k, v = qkv(batch=1, heads=1, nq=queries, nk=37, dtype=dtype)
    q = q * torch.linspace(1, 30, queries)[:, None].to(dtype)
    threads = torch.get_num_threads()
    _, grads, grad = kernel_grads(q, k, v)
    torch.set_num_threads(1)
    try:
        _, alone, _ = kernel_grads(q, k, v)
    finally:
        torch.set_num_threads(threads)
    assert_grads_near(grads, q, k, v, None, grad)
    assert_grads_near(alone, q, k, v, None, grad)


@needs_kernel
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('mask_shape', [(3, 1, 1, 49), (3, 2, 49, 49), (49, 49), (3, 1, 49, 1)],
                         ids=['key mask', 'per query and head', '2-D', 'per query'])
def test_masked_keys_get_no_gradient(kernel_calls, dtype, mask_shape):
    q, k, v = qkv(dtype=dtype)
    torch.manual_seed(1)
    mask = torch.rand(mask_shape) > 0.3
    if mask_shape[-1] > 1:
        mask[..., 0] = True
    mask = mask.expand(3, 2, 49, 49).clone()
    mask[1, 0, :, 3] = False  # a key no query attends: dk, dv 0
    mask[2, 1, 4] = False  # a query without keys: output and dq 0
    _, (dq, dk, dv), grad = kernel_grads(q, k, v, mask)
    assert dk[1, 0, 3].eq(0).all() and dv[1, 0, 3].eq(0).all() and dq[2, 1, 4].eq(0).all()
    attends = mask.any(-1)
    assert dq[~attends].eq(0).all()
    # the rest against a reference where the queries without keys have no gradient
    assert_grads_near((dq, dk, dv), q, k, v, mask | ~attends[..., None],
                      grad * attends[..., None])


@needs_kernel
def test_the_backward_takes_broadcast_gradients_contiguous_inputs_and_no_queries(kernel_calls):
    q, k, v = (t.contiguous() for t in qkv(nk=20))
    grad = torch.ones(()).expand(q.shape)  # what out.sum() sends back
    assert_grads_near(kernel_grads(q, k, v, grad=grad)[1], q, k, v, None, grad)
    dq, dk, dv = kernel_grads(q[:, :, :0], k, v)[1]
    assert dq.shape == (3, 2, 0, 32) and dk.eq(0).all() and dv.eq(0).all()


@needs_kernel
def test_the_backward_checks_its_arguments():
    q, k, v = qkv()
    out, lse = attention._ext.attention(q, k, v, None, 32 ** -0.5, True)
    backward = attention._ext.attention_backward
    with pytest.raises(RuntimeError, match="grad and out of q's shape and dtype"):
        backward(out[:, :, 1:], q, k, v, out, lse, None, 32 ** -0.5)
    with pytest.raises(RuntimeError, match='fp32 log-sum-exps'):
        backward(out, q, k, v, out, lse[..., 1:], None, 32 ** -0.5)
    with pytest.raises(RuntimeError, match='q, k and v all fp32 or all bf16'):
        backward(out, q, k.double(), v, out, lse, None, 32 ** -0.5)
    with pytest.raises(RuntimeError, match='a boolean CPU mask'):
        backward(out, q, k, v, out, lse, torch.zeros(49), 32 ** -0.5)


@needs_kernel
@pytest.mark.parametrize('cls,arch', [(SVT, TINY_SVT), (PCPVT, TINY_PCPVT)])
def test_training_steps_of_whole_networks_take_the_kernel(kernel_calls, monkeypatch, cls, arch):
    """Gradients of every parameter within fp32 rounding of PyTorch's kernel's."""
    torch.manual_seed(0)
    model = cls(arch=arch).train()
    x = torch.randn(2, 3, 96, 80)

    def grads():
        model.zero_grad()
        sum(out.square().mean() for out in model(x)).backward()
        return [p.grad.clone() for p in model.parameters()]

    with_kernel = grads()
    assert kernel_calls
    monkeypatch.setattr(attention, 'NATIVE_ATTENTION', False)
    for got, expected in zip(with_kernel, grads()):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
