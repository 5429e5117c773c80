import functools

import pytest
import torch

# A 4-stage Twins small enough for fast tests; stage 0 and 2 have LSA windows, as SVT does.
TINY_SVT = dict(embed_dims=[16, 32, 32, 64], num_heads=[1, 2, 2, 4], mlp_ratios=[2, 2, 2, 2],
                depths=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1], window_sizes=[7, 7, 7, 7])
TINY_PCPVT = dict(TINY_SVT, window_sizes=[None] * 4, depths=[1, 1, 1, 1])


def projected_loss(outs) -> torch.Tensor:
    """A loss with a gradient behind every stage: the maps' sum with fixed random weights.

    Neither a plain nor a squared sum will do behind a LayerNorm at its init (unit weight, zero
    bias, as SVT's stage norms): its outputs sum to zero over the channels and their squares to
    about C, so the gradient into the stage is rounding noise, which AdamW's normalised step
    turns into full-size updates or, where it is exactly zero, none.
    """
    g = torch.Generator().manual_seed(0)
    return sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope='session', autouse=True)
def fast_package_configs():
    """Parse each installed package's model index once per test session.

    To resolve every ``mmdet::``/``mmseg::`` base config, mmengine 0.10.7 parses all of the
    package's metafiles (~400 for mmdet) and re-checks the installation first: 1-2 s per base
    reference here. Only mmengine's config resolution is patched (its own ``load`` and
    ``is_installed`` names); the installed files do not change during a run.
    """
    import mmengine.config.config as cfg_config
    import mmengine.config.utils as cfg_utils
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cfg_utils, 'load', functools.lru_cache(maxsize=None)(cfg_utils.load))
        mp.setattr(cfg_config, 'is_installed',
                   functools.lru_cache(maxsize=None)(cfg_config.is_installed))
        yield


@pytest.fixture(scope='module')
def one_torch_thread():
    """Run torch ops on one thread: with tiny tensors on a shared 2-core machine, a second OpenMP
    thread waiting for a busy core made each op up to ~80x slower (measured: a segmentation TTA
    test pass 9 s with 1 thread against 47-77 s with 2 under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
