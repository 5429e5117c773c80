"""The speed and memory levers change nothing but speed and memory: same values, same gradients."""
import pytest
import torch

from mmtwins.analysis.peers import build_impl, saved_tensor_mb
from mmtwins.models.layers import Mlp

# 64 hidden channels: a chunk bound of 7 * 64 elements gives chunks of 7 token rows, so 2 x 10
# tokens run as 7 + 7 + 6 rows; None computes the hidden tensor whole.
CHUNKINGS = [7 * 64, None]


def _grads(mlp, x, plain: bool, autocast: bool = False):
    mlp.zero_grad()
    x = x.clone().requires_grad_(True)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        y = mlp.fc2(mlp.act(mlp.fc1(x))) if plain else mlp(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return [y.detach()] + [x.grad] + [p.grad.clone() for p in mlp.parameters()]


@pytest.mark.parametrize('chunk_elems', CHUNKINGS)
def test_chunked_mlp_matches_the_plain_composition_in_fp32(chunk_elems):
    torch.manual_seed(0)
    mlp, x = Mlp(16, 64, chunk_elems=chunk_elems), torch.randn(2, 10, 16)
    for ours, plain in zip(_grads(mlp, x, plain=False), _grads(mlp, x, plain=True)):
        torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), mlp.fc2(mlp.act(mlp.fc1(x))), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('chunk_elems', CHUNKINGS)
def test_chunked_mlp_in_fp64_sums_its_gradients_in_fp64(chunk_elems):
    torch.manual_seed(0)
    mlp = Mlp(16, 64, chunk_elems=chunk_elems).double()
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    for ours, plain in zip(_grads(mlp, x, plain=False), _grads(mlp, x, plain=True)):
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('chunk_elems', CHUNKINGS)
def test_chunked_mlp_under_bf16_autocast_keeps_dtypes_and_fp32_accuracy(chunk_elems):
    """Autocast dtypes as F.linear's; weight gradients summed over chunks in fp32, so they are
    no further from the fp32 gradients than autocast's own ones."""
    torch.manual_seed(0)
    mlp, x = Mlp(16, 64, chunk_elems=chunk_elems), torch.randn(2, 10, 16)
    ours = _grads(mlp, x, plain=False, autocast=True)
    plain = _grads(mlp, x, plain=True, autocast=True)
    ref = _grads(mlp, x, plain=True)
    for a, b, r in zip(ours, plain, ref):
        assert a.dtype == b.dtype
        scale = r.abs().max().item()
        assert (a.float() - r).abs().max().item() <= max(
            (b.float() - r).abs().max().item(), 0.01 * scale)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        y, y_plain = mlp(x), mlp.fc2(mlp.act(mlp.fc1(x)))
    assert y.dtype == y_plain.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_plain)


def test_chunked_mlp_computes_only_the_gradients_needed():
    mlp, x = Mlp(16, 64, chunk_elems=7 * 64), torch.randn(2, 10, 16, requires_grad=True)
    mlp.requires_grad_(False)  # a frozen stage under a trainable one
    mlp(x).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in mlp.parameters())
    x = torch.randn(2, 10, 16)  # input without gradient, trainable weights
    mlp.requires_grad_(True)
    mlp(x).sum().backward()
    assert all(p.grad is not None for p in mlp.parameters())


def test_chunked_mlp_keeps_only_its_input_and_the_pre_activation_for_backward():
    mlp, x = Mlp(16, 64, chunk_elems=7 * 64), torch.randn(2, 10, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mlp(x)
    params = {p.data_ptr() for p in mlp.parameters()}
    acts = [t for t in saved if t.data_ptr() not in params]
    # x (20 x 16) and the three hidden chunks (7 + 7 + 6 rows of 64): never gelu(h)
    assert sorted(tuple(t.shape) for t in acts) == [(6, 64), (7, 64), (7, 64), (20, 16)]


@pytest.mark.parametrize('hw', [(14, 14), (9, 12)], ids=['whole-windows', 'padded'])
def test_lsa_projection_keeps_no_copy_of_the_attention_output(hw):
    from mmtwins.models.layers import LocallyGroupedAttention
    attn = LocallyGroupedAttention(16, num_heads=2, window_size=7)
    x = torch.randn(2, hw[0] * hw[1], 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = attn(x, hw)
    windows = 2 * 2 * 2  # batch 2, 2 x 2 windows of 7 x 7 either way
    # The attention's output (windows, heads, 49, d), token-major (q, k, v have row stride 3C),
    # and the 2-D inputs the qkv and proj linears keep.
    out = [t for t in saved if t.shape == (windows, 2, 49, 8) and t.stride(2) == 16]
    rows = [t for t in saved if t.shape == (windows * 49, 16)]
    assert len(out) == 1 and len(rows) == 2
    ptr = out[0].untyped_storage().data_ptr()
    assert sum(t.untyped_storage().data_ptr() == ptr for t in rows) == 1
    assert y.shape == x.shape


@pytest.mark.parametrize('family', ['svt', 'pcpvt'])
def test_training_keeps_at_most_0_8x_the_activations_of_timm(family):
    """Bytes autograd keeps for backward (a deterministic count, not a timing)."""
    x = torch.randn(1, 3, 128, 128)
    ours = saved_tensor_mb(build_impl('mmtwins', family, 'small'), x)
    timm = saved_tensor_mb(build_impl('timm', family, 'small'), x)
    assert ours <= 0.8 * timm
