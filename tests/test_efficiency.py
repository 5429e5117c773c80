"""The memory levers change nothing but memory: same values, same gradients."""
import pytest
import torch

from mmtwins.analysis.peers import build_impl, saved_tensor_mb
from mmtwins.models.layers.block import Mlp


def _grads(mlp, x, fused: bool, autocast: bool = False):
    mlp.zero_grad()
    x = x.clone().requires_grad_(True)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        if fused:
            y = mlp(x)
        else:  # the plain composition, which stores gelu(h) for fc2's backward
            y = mlp.fc2(mlp.act(mlp.fc1(x)))
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return [y.detach().float(), x.grad] + [p.grad.clone() for p in mlp.parameters()]


def test_gelu_recompute_matches_plain_mlp_fp32():
    mlp = Mlp(16, 64)
    x = torch.randn(2, 10, 16)
    for a, b in zip(_grads(mlp, x, True), _grads(mlp, x, False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gelu_recompute_matches_plain_mlp_under_bf16_autocast():
    mlp = Mlp(16, 64)
    x = torch.randn(2, 10, 16)
    fused, plain = _grads(mlp, x, True, autocast=True), _grads(mlp, x, False, autocast=True)
    for a, b in zip(fused, plain):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize('family', ['svt', 'pcpvt'])
def test_training_keeps_at_most_0_8x_the_activations_of_timm(family):
    """Bytes autograd keeps for backward (a deterministic count, not a timing)."""
    x = torch.randn(1, 3, 128, 128)
    ours = saved_tensor_mb(build_impl('mmtwins', family, 'small'), x)
    timm = saved_tensor_mb(build_impl('timm', family, 'small'), x)
    assert ours <= 0.8 * timm
