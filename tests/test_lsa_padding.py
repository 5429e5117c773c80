"""LSA on maps that are not whole windows: padded keys are masked per side, independently."""
import pytest
import torch

from mmtwins.models.layers import LocallyGroupedAttention


def reference_lsa(attn: LocallyGroupedAttention, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Window attention computed window by window over only the real tokens of each window."""
    B, N, C = x.shape
    ws, nh, d = attn.window_size, attn.num_heads, attn.head_dim
    grid = x.view(B, H, W, C)
    out = torch.empty_like(grid)
    for r0 in range(0, H, ws):
        for c0 in range(0, W, ws):
            win = grid[:, r0:r0 + ws, c0:c0 + ws]
            h, w = win.shape[1:3]
            q, k, v = attn.qkv(win.reshape(B, h * w, C)).view(B, h * w, 3, nh, d).unbind(2)
            a = torch.einsum('bqhd,bkhd->bhqk', q, k).mul(d**-0.5).softmax(-1)
            o = torch.einsum('bhqk,bkhd->bqhd', a, v).reshape(B, h, w, C)
            out[:, r0:r0 + h, c0:c0 + w] = o
    return attn.proj(out.reshape(B, N, C))


@pytest.mark.parametrize('hw', [(14, 14), (9, 14), (14, 10), (9, 10), (3, 5)],
                         ids=['none', 'bottom-only', 'right-only', 'both', 'smaller-than-window'])
def test_lsa_matches_reference_for_every_padding_case(hw):
    attn = LocallyGroupedAttention(dim=16, num_heads=2, window_size=7).eval()
    x = torch.randn(2, hw[0] * hw[1], 16)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, hw), reference_lsa(attn, x, *hw), atol=1e-5, rtol=1e-5)


def _peer_lsa(peer: str):
    if peer == 'mmseg':
        from mmseg.models.backbones.twins import LocallyGroupedSelfAttention
    else:
        from mmpretrain.models.backbones.twins import LocallyGroupedSelfAttention
    return LocallyGroupedSelfAttention(16, 2, qkv_bias=True, window_size=7).eval()


@pytest.mark.parametrize('peer', ['mmseg', 'mmpretrain'])
@pytest.mark.parametrize('hw', [(9, 14), (14, 10)], ids=['bottom-only', 'right-only'])
def test_peer_lsa_mask_is_wrong_with_one_sided_padding_and_ours_is_not(peer, hw):
    """The defect users hit in mmseg and mmpretrain: with padding on one side only (e.g. 200x336
    tokens in 7-windows: bottom only), their mask switches off and real tokens attend to
    padding. Ours matches the reference there; theirs, with the same weights, does not."""
    ours = LocallyGroupedAttention(dim=16, num_heads=2, window_size=7).eval()
    theirs = _peer_lsa(peer)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(1, hw[0] * hw[1], 16)
    with torch.no_grad():
        ref = reference_lsa(ours, x, *hw)
        torch.testing.assert_close(ours(x, hw), ref, atol=1e-5, rtol=1e-5)
        assert (theirs(x, hw) - ref).abs().max() > 1e-3
        # whole windows: the peer agrees, so the difference above is its mask alone
        y = torch.randn(1, 14 * 14, 16)
        torch.testing.assert_close(theirs(y, (14, 14)), reference_lsa(ours, y, 14, 14),
                                   atol=1e-5, rtol=1e-5)
