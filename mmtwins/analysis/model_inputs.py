"""Build any mmtwins config's model (classifier, detector, segmentor) with a dummy batch to run.

The analysis tools measure one of two parts:

- ``'model'``: the whole network in MMEngine's ``mode='tensor'`` (raw head outputs: no box
  decoding, NMS or resizing of segmentation logits), on a batch that went through the model's own
  data preprocessor (normalisation, and the padding to a size divisor that detectors use);
- ``'backbone'``: ``model.backbone`` alone on the same preprocessed batch.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
from mmengine.config import Config
from mmengine.model import BaseModel, revert_sync_batchnorm
from mmengine.registry import MODELS, init_default_scope
from torch import nn

PARTS = ('model', 'backbone')
# (H, W) at which the paper reports FLOPs: Table 1 (ImageNet), Tables 3-4 (COCO "800x600"),
# Table 2 (ADE20K).
PAPER_INPUT_SHAPES = {'mmpretrain': (224, 224), 'mmdet': (600, 800), 'mmseg': (512, 512)}


def load_config(config: Union[str, Config], cfg_options: Optional[dict] = None) -> Config:
    """Read a config file (its ``custom_imports`` are imported), or copy a given ``Config``,
    and merge ``cfg_options`` into it; a given ``Config`` is left as it was."""
    cfg = config.copy() if isinstance(config, Config) else Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def build_module(cfg: Config) -> nn.Module:
    """Build ``cfg.model`` as the Runner does, in eval mode, SyncBN reverted to BN: any model,
    a bare backbone too.

    ``init_weights`` is not called: counts and speed do not depend on the weights, and no
    pretrained checkpoint named by an ``init_cfg`` is needed.

    As in :class:`mmengine.runner.Runner`, the config's default scope is used and a top-level
    ``data_preprocessor`` (mmpretrain's configs keep it there) goes into the model.
    """
    init_default_scope(cfg.get('default_scope') or 'mmengine')
    model_cfg = cfg.model.copy()
    if cfg.get('data_preprocessor') is not None:
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    return revert_sync_batchnorm(MODELS.build(model_cfg)).eval()


def build_model(cfg: Config) -> BaseModel:
    """:func:`build_module` for an OpenMMLab model (classifier, detector or segmentor)."""
    model = build_module(cfg)
    if not isinstance(model, BaseModel):
        raise TypeError(f'the config builds a {type(model).__name__}, not an OpenMMLab model '
                        '(classifier, detector or segmentor); the analysis tools need one')
    return model


def model_family(model: nn.Module) -> str:
    """``'mmpretrain'``, ``'mmdet'`` or ``'mmseg'``: the package the model class comes from."""
    family = type(model).__module__.split('.')[0]
    if family not in PAPER_INPUT_SHAPES:
        raise ValueError(f'{type(model).__name__} comes from {family!r}; expected a model of '
                         f'one of {sorted(PAPER_INPUT_SHAPES)}')
    return family


def default_input_shape(model: nn.Module) -> Tuple[int, int]:
    """The (H, W) at which the paper reports this kind of model's FLOPs."""
    return PAPER_INPUT_SHAPES[model_family(model)]


def _data_samples(family: str, shape: Tuple[int, int], batch_size: int) -> Optional[List]:
    """One data sample per image with the meta information test-mode heads read."""
    if family == 'mmdet':
        from mmdet.structures import DetDataSample as Sample
    elif family == 'mmseg':
        from mmseg.structures import SegDataSample as Sample
    else:
        return None
    meta = dict(img_shape=shape, ori_shape=shape, scale_factor=(1., 1.), flip=False,
                flip_direction=None)
    return [Sample(metainfo=meta) for _ in range(batch_size)]


def dummy_batch(model: BaseModel, shape: Sequence[int], batch_size: int = 1,
                device: Union[str, torch.device] = 'cpu') -> Tuple[torch.Tensor, Optional[List]]:
    """A random uint8 batch passed through the model's data preprocessor.

    Returns:
        ``(inputs, data_samples)``: inputs (B, 3, H', W') float, where H', W' are H, W padded
        as the preprocessor pads (e.g. to a multiple of 32 for detectors); ``data_samples``
        is ``None`` for classifiers.
    """
    h, w = (int(s) for s in shape)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for _ in range(batch_size)]
    data = dict(inputs=images)
    samples = _data_samples(model_family(model), (h, w), batch_size)
    if samples is not None:
        data['data_samples'] = samples
    model.to(device)
    data = model.data_preprocessor(data, False)
    return data['inputs'], data.get('data_samples')


class TensorForward(nn.Module):
    """``forward(inputs)`` runs the wrapped OpenMMLab model in ``mode='tensor'``.

    Tracers and timers call a module with tensors only; the (fixed) data samples that a
    two-stage detector's ``mode='tensor'`` needs are held by the wrapper.
    """

    def __init__(self, model: BaseModel, data_samples: Optional[List] = None):
        super().__init__()
        self.model = model
        self.data_samples = data_samples

    def forward(self, inputs: torch.Tensor):
        return self.model(inputs, self.data_samples, mode='tensor')


def runnable(model: BaseModel, part: str, shape: Sequence[int], batch_size: int = 1,
             device: Union[str, torch.device] = 'cpu') -> Tuple[nn.Module, torch.Tensor]:
    """The module to measure for ``part`` (see :data:`PARTS`) and its input batch."""
    if part not in PARTS:
        raise ValueError(f'part must be one of {PARTS}, got {part!r}')
    inputs, samples = dummy_batch(model, shape, batch_size, device)
    if part == 'backbone':
        if not hasattr(model, 'backbone'):
            raise ValueError(f'{type(model).__name__} has no backbone to measure alone')
        return model.backbone, inputs
    return TensorForward(model, samples), inputs
