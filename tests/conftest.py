import pytest
import torch

# A 4-stage Twins small enough for fast tests; stage 0 and 2 have LSA windows, as SVT does.
TINY_SVT = dict(embed_dims=[16, 32, 32, 64], num_heads=[1, 2, 2, 4], mlp_ratios=[2, 2, 2, 2],
                depths=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1], window_sizes=[7, 7, 7, 7])
TINY_PCPVT = dict(TINY_SVT, window_sizes=[None] * 4, depths=[1, 1, 1, 1])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
