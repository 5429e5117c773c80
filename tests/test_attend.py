"""``attend``: PyTorch's fused attention, or in bf16 CPU inference (AVX512-BF16 without AMX) its
composition from matmuls and a softmax in cache-sized chunks, with the same values."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from mmtwins.analysis.peers import autocast_cosine
from mmtwins.models import PCPVT, SVT
from mmtwins.models.layers import (GlobalSubsampledAttention, LocallyGroupedAttention, attention,
                                   graph)
from mmtwins.models.layers.attention import attend

from conftest import TINY_PCPVT, TINY_SVT


@pytest.fixture
def bf16_cpu(monkeypatch):
    """The composition's CPU condition, whatever this machine is; its values are the same on any
    CPU, only its speed was measured on one."""
    monkeypatch.setattr(attention, 'COMPOSE_CPU', True)


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


def qkv(batch=3, heads=2, nq=49, nk=49, d=16, dtype=torch.bfloat16):
    torch.manual_seed(0)
    return [torch.randn(batch, heads, n, d).to(dtype) for n in (nq, nk, nk)]


@pytest.mark.parametrize('keys', [49, 64, 5])
@pytest.mark.parametrize('masked', [False, True])
def test_bf16_inference_composes_with_the_fused_kernels_values(bf16_cpu, masked, keys):
    # keys: score rows padded to 64 (49: LSA's windows), of whole registers already (64), and
    # padded to 32 (5)
    q, k, v = qkv(nk=keys)
    # per batch element, as LSA's key mask (windows, 1, 1, keys); every row keeps one key
    mask = torch.rand(3, 1, 1, keys) > 0.3 if masked else None
    if masked:
        mask[..., 0] = True
    with torch.inference_mode():
        fused, out = fused_ran(attend, q, k, v, mask)
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
        kernel = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert not fused and out.dtype == torch.bfloat16 and out.shape == q.shape
    # bf16 rounding of the logits and weights: within a few bf16 ulps of the exact values, as
    # the fused kernel (which keeps them in fp32) is
    err, kernel_err = [(t.double() - exact).abs().max().item() for t in (out, kernel)]
    assert err < 0.03 and kernel_err < 0.03


@pytest.mark.parametrize('case', ['fp32', 'gradient', 'dropout', 'other CPU', 'exporting',
                                  'compiling', 'oneDNN disabled', 'fp16 autocast', 'float mask',
                                  '3-D'])
def test_the_fused_kernel_runs_where_the_composition_does_not_apply(bf16_cpu, monkeypatch, case):
    q, k, v = qkv(dtype=torch.float32 if case == 'fp32' else torch.bfloat16)
    dropout = 0.5 if case == 'dropout' else 0.
    mask, context = None, contextlib.nullcontext()
    if case == 'gradient':
        q.requires_grad_()
    elif case == 'other CPU':
        monkeypatch.setattr(attention, 'COMPOSE_CPU', False)
    elif case == 'exporting':
        monkeypatch.setattr(graph, 'is_exporting', lambda: True)
    elif case == 'compiling':
        monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    elif case == 'oneDNN disabled':
        context = torch.backends.mkldnn.flags(enabled=False)
    elif case == 'fp16 autocast':  # the kernel computes in fp16 there
        context = torch.autocast('cpu', dtype=torch.float16)
    elif case == 'float mask':  # added to the scores
        mask = torch.zeros(3, 1, 1, 49, dtype=torch.bfloat16)
    elif case == '3-D':
        q, k, v = q[0], k[0], v[0]
    with context:
        fused, out = fused_ran(attend, q, k, v, mask, dropout)
    assert fused and out.shape == q.shape


def test_a_tensor_that_needs_no_gradient_composes_where_gradients_are_on(bf16_cpu):
    assert not fused_ran(attend, *qkv())[0]


def test_no_queries_give_an_empty_output(bf16_cpu):
    q, k, v = qkv(nq=0)
    with torch.inference_mode():
        assert attend(q, k, v).shape == (3, 2, 0, 16)


@pytest.mark.parametrize('mask_shape', [None, (3, 1, 1, 49), (3, 1, 49, 49), (49, 49)],
                         ids=['no mask', 'key mask', 'full mask', 'one mask for all'])
@pytest.mark.parametrize('chunk', [1, 3 * 2 * 10 * 64, 3 * 2 * 16 * 64, 2 * 49 * 64,
                                   2 * 2 * 49 * 64],
                         ids=['one row', '10 rows', '16 rows', 'one entry', 'two entries'])
def test_chunks_give_the_values_of_one_whole_composition(bf16_cpu, monkeypatch, mask_shape, chunk):
    # 49 keys: score rows of 64 (SOFTMAX_LANES 32); chunks of rows of every entry, or (where an
    # entry's scores fit) of whole entries, as LSA's windows
    q, k, v = qkv()
    mask = None
    if mask_shape:  # the key mask (3, 1, 1, 49) is broadcast over the queries, as LSA's
        mask = torch.rand(mask_shape) > 0.3
        mask[..., 0] = True
    with torch.inference_mode():
        whole = attend(q, k, v, mask)
        monkeypatch.setattr(attention, 'COMPOSE_CHUNK_SCORES', chunk)
        chunked = attend(q, k, v, mask)
    torch.testing.assert_close(chunked, whole, atol=0, rtol=0)


@pytest.mark.parametrize('nq,nk,mask_shape,chunk', [
    (7, 5, (3, 2, 7, 5), 1), (7, 5, (1, 2, 1, 5), 2 * 7 * 32),
    (13, 64, (3, 1, 13, 64), 3 * 2 * 4 * 64), (13, 33, None, 2 * 2 * 13 * 64)],
    ids=['rows, per-head mask', 'entries, shared mask', 'rows of whole registers', 'entries'])
def test_chunks_of_padded_rows_compose_the_exact_values(bf16_cpu, monkeypatch, nq, nk, mask_shape,
                                                        chunk):
    q, k, v = qkv(nq=nq, nk=nk)
    mask = None
    if mask_shape:
        mask = torch.rand(mask_shape) > 0.3
        mask[..., 0] = True
    monkeypatch.setattr(attention, 'COMPOSE_CHUNK_SCORES', chunk)
    with torch.inference_mode():
        fused, out = fused_ran(attend, q, k, v, mask)
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    assert not fused and (out.double() - exact).abs().max() < 0.03


def test_an_empty_batch_in_row_chunks(bf16_cpu, monkeypatch):
    monkeypatch.setattr(attention, 'COMPOSE_CHUNK_SCORES', 1)
    q, k, v = qkv(batch=0)
    with torch.inference_mode():
        assert attend(q, k, v).shape == (0, 2, 49, 16)


def test_keys_broadcast_over_the_batch_and_heads_take_the_kernel(bf16_cpu):
    q = qkv()[0]
    _, k, v = qkv(batch=1, heads=1)
    with torch.inference_mode():
        fused, out = fused_ran(attend, q, k, v)
        kernel = F.scaled_dot_product_attention(q, k, v)
    assert fused
    torch.testing.assert_close(out, kernel, atol=0, rtol=0)


@pytest.mark.parametrize('hw', [(14, 14), (9, 10)], ids=['whole windows', 'padded'])
@pytest.mark.parametrize('cls', [LocallyGroupedAttention, GlobalSubsampledAttention])
def test_attention_layers_in_bf16_inference_compose_to_the_fused_values(bf16_cpu, monkeypatch,
                                                                        cls, hw):
    torch.manual_seed(0)
    layer = (cls(32, 2, window_size=7) if cls is LocallyGroupedAttention
             else cls(32, 2, sr_ratio=2)).eval()
    x = torch.randn(2, hw[0] * hw[1], 32)
    with torch.inference_mode(), torch.autocast('cpu', torch.bfloat16):
        fused, composed = fused_ran(layer, x, hw)
        monkeypatch.setattr(attention, 'COMPOSE_CPU', False)
        kernel_ran, kernel = fused_ran(layer, x, hw)
    assert not fused and kernel_ran and composed.dtype == kernel.dtype == torch.bfloat16
    with torch.inference_mode():
        exact = layer.double()(x.double(), hw)
    for out in (composed, kernel):
        assert F.cosine_similarity(out.double().flatten(), exact.flatten(), 0) > 0.9999


@pytest.mark.parametrize('cls,arch', [(SVT, TINY_SVT), (PCPVT, TINY_PCPVT)])
def test_whole_network_under_bf16_autocast_composes_within_the_cosine_bound(bf16_cpu, cls, arch):
    torch.manual_seed(0)
    model = cls(arch=arch).eval()
    x = torch.randn(2, 3, 96, 80)
    assert autocast_cosine(model, x) >= 0.999
    # every bf16 call composes; the fp32 reference took the kernel
    with torch.inference_mode(), torch.autocast('cpu', torch.bfloat16):
        assert not fused_ran(model, x)[0]
