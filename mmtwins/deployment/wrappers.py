"""Models as export-ready modules: normalised images (B, C, H, W) in, a flat tuple of tensors out.

What each kind of model exports (everything after it is left to the runtime, or to mmdeploy):

================  ============================================================================
model             outputs
================  ============================================================================
backbone          ``feat{i}`` (B, C_i, ceil(H / s_i), ceil(W / s_i)) per ``out_indices`` entry
mmseg segmentor   ``seg_logits`` (B, K, H, W), or ``seg_labels`` (B, H, W) int64
                  (``EncoderDecoder``, whole-image inference)
mmdet one-stage   the dense head's raw maps per level, named after the head's
                  ``predict_by_feat`` arguments: ``cls_scores_{l}``, ``bbox_preds_{l}``, ...
                  (box decoding and NMS are not in the graph)
mmdet two-stage   the neck's ``feat{l}`` and the RPN head's ``cls_scores_{l}``, ``bbox_preds_{l}``
                  (proposal NMS, RoIAlign and the RoI head are not in the graph)
================  ============================================================================

Wrapping a segmentor swaps, in place, two kinds of modules for traceable equivalents of the
same values (:func:`make_traceable`). The graph takes the images after
the model's ``data_preprocessor`` (mean/std normalisation and
channel order are done by the caller, as mmdeploy does), padded or not: the Twins backbone pads
any size internally.
"""
import inspect
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from mmengine.config import Config
from torch import nn
from torch.nn.modules.utils import _pair

from mmtwins.analysis.model_inputs import build_module, load_config
from mmtwins.checkpoint import (check_checkpoint_file, fitting_state_dict, load_twins_checkpoint,
                                read_checkpoint)
from mmtwins.models import Twins

Named = List[Tuple[str, torch.Tensor]]


class ExportModule(nn.Module):
    """Base of the export wrappers.

    Subclasses implement :meth:`named_outputs`; ``forward`` returns its tensors as a flat tuple
    and :meth:`output_shapes` their names (static strings, so tracing records none of this) and
    shapes.

    Attributes:
        kind (str): ``'backbone'``, ``'segmentor'`` or ``'detector'``.
        in_channels (int): Image channels the graph takes.
        min_input_size (int): Smallest height/width the backbone accepts.
    """
    kind = ''

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.in_channels = getattr(backbone, 'in_channels', 3)
        self.min_input_size = getattr(backbone, 'min_input_size', 1)

    def named_outputs(self, images: torch.Tensor) -> Named:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(t for _, t in self.named_outputs(images))

    @torch.no_grad()
    def output_shapes(self, images: torch.Tensor) -> Dict[str, Tuple[int, ...]]:
        """Each output's name and shape, in order, from one forward pass on ``images``."""
        return {name: tuple(t.shape) for name, t in self.named_outputs(images)}


class BackboneExport(ExportModule):
    """A backbone alone: ``feat{i}`` per returned stage."""
    kind = 'backbone'

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self.backbone = backbone
        self.indices = tuple(getattr(backbone, 'out_indices', ()))

    def named_outputs(self, images: torch.Tensor) -> Named:
        feats = self.backbone(images)
        indices = self.indices if len(self.indices) == len(feats) else range(len(feats))
        return [(f'feat{i}', f) for i, f in zip(indices, feats)]


class SegmentorExport(ExportModule):
    """An mmseg ``EncoderDecoder``: logits resized to the input, or the label map.

    Args:
        segmentor (nn.Module): The segmentor (one decode head; the auxiliary head is unused).
        output (str): ``'logits'`` (B, K, H, W) or ``'labels'`` (B, H, W), the arg-max over
            classes (a sigmoid threshold for a one-channel head, as mmseg does).
    """
    kind = 'segmentor'

    def __init__(self, segmentor: nn.Module, output: str = 'logits'):
        super().__init__(segmentor.backbone)
        if isinstance(segmentor.decode_head, nn.ModuleList):
            raise NotImplementedError('cascaded decode heads (CascadeEncoderDecoder) are not '
                                      'supported for export; use mmdeploy')
        if output not in ('logits', 'labels'):
            raise ValueError(f"output must be 'logits' or 'labels', got {output!r}")
        self.segmentor = make_traceable(segmentor)
        self.output = output

    def named_outputs(self, images: torch.Tensor) -> Named:
        from mmseg.models.utils import resize
        head = self.segmentor.decode_head
        logits = head.forward(self.segmentor.extract_feat(images))
        logits = resize(logits, size=images.shape[2:], mode='bilinear',
                        align_corners=head.align_corners, warning=False)
        # The same shape again, the classes as a Python int: the exported graph then declares
        # them as a number (the resize's output shape leaves them to the exporter's naming).
        logits = logits.reshape(logits.shape[0], head.out_channels, *logits.shape[2:])
        if self.output == 'logits':
            return [('seg_logits', logits)]
        if head.out_channels == 1:
            labels = (logits.sigmoid() > head.threshold).squeeze(1).long()
        else:
            labels = logits.argmax(dim=1)
        return [('seg_labels', labels)]


class ScaleUpsample(nn.Module):
    """mmseg's ``Upsample`` with an integer ``scale_factor``, computing the output size in the
    graph (mmseg computes it with Python ``int()``, which tracing freezes at the example size).
    Same values: for an integer factor, interpolation by size and by factor sample alike.

    Shapes:
        (B, C, H, W) -> (B, C, s * H, s * W), s = ``scale_factor``.
    """

    def __init__(self, scale_factor: int, mode: str, align_corners: Optional[bool]):
        super().__init__()
        self.scale_factor, self.mode, self.align_corners = scale_factor, mode, align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode,
                             align_corners=self.align_corners)


class SlicedAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` as one mean per output bin over traced slice bounds.

    Bin ``i`` of ``n`` over a side of length ``L`` covers ``[floor(i L / n), ceil((i+1) L / n))``,
    as in PyTorch. The TorchScript exporter cannot export adaptive pooling of an input whose
    size is not known at export time (UperNet's pyramid pooling); this form can.

    Shapes:
        (..., H, W) -> (..., oh, ow), ``(oh, ow) = output_size``.
    """

    def __init__(self, output_size: Tuple[int, int]):
        super().__init__()
        self.output_size = output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        oh, ow = self.output_size
        rows = []
        for i in range(oh):
            h0, h1 = i * H // oh, ((i + 1) * H + oh - 1) // oh
            rows.append(torch.cat([
                x[..., h0:h1, j * W // ow:((j + 1) * W + ow - 1) // ow].mean((-2, -1), True)
                for j in range(ow)
            ], dim=-1))
        return torch.cat(rows, dim=-2)


def make_traceable(model: nn.Module) -> nn.Module:
    """Replace, in place, what the TorchScript exporter freezes at the example size or cannot
    export with dynamic sizes: mmseg ``Upsample`` of integer scale (Semantic FPN's head) by
    :class:`ScaleUpsample`, ``nn.AdaptiveAvgPool2d`` (UperNet's pyramid pooling) by
    :class:`SlicedAdaptiveAvgPool2d`. Same values; returns ``model``."""
    from mmseg.models.utils import Upsample
    for name, child in model.named_children():
        factor = getattr(child, 'scale_factor', None)
        if (isinstance(child, Upsample) and not child.size
                and isinstance(factor, (int, float)) and float(factor).is_integer()):
            setattr(model, name, ScaleUpsample(int(factor), child.mode, child.align_corners))
        elif isinstance(child, nn.AdaptiveAvgPool2d) and None not in _pair(child.output_size):
            setattr(model, name, SlicedAdaptiveAvgPool2d(_pair(child.output_size)))
        else:
            make_traceable(child)
    return model


class DetectorExport(ExportModule):
    """An mmdet detector up to its dense head's raw outputs (see the module docstring)."""
    kind = 'detector'

    def __init__(self, detector: nn.Module):
        super().__init__(detector.backbone)
        self.detector = detector
        self.two_stage = getattr(detector, 'with_rpn', False)
        self.head = detector.rpn_head if self.two_stage else getattr(detector, 'bbox_head', None)
        if self.head is None:
            raise NotImplementedError(f'{type(detector).__name__} has neither an RPN nor a '
                                      'dense bbox head; use mmdeploy to export it')
        params = inspect.signature(self.head.predict_by_feat).parameters
        self.group_names = list(params)

    def named_outputs(self, images: torch.Tensor) -> Named:
        feats = self.detector.extract_feat(images)
        named = [(f'feat{i}', f) for i, f in enumerate(feats)] if self.two_stage else []
        for g, group in enumerate(self.head(feats)):
            name = self.group_names[g] if g < len(self.group_names) else f'output{g}'
            named += [(f'{name}_{level}', t) for level, t in enumerate(group)]
        return named


def build_export_module(model: nn.Module, backbone_only: bool = False,
                        seg_output: str = 'logits') -> ExportModule:
    """Wrap ``model`` (a backbone, an mmseg segmentor or an mmdet detector) for export.

    Args:
        model (nn.Module): The built model.
        backbone_only (bool): Export ``model.backbone`` alone.
        seg_output (str): ``'logits'`` or ``'labels'`` for a segmentor.
    """
    model = model.eval()
    if isinstance(model, Twins) or not hasattr(model, 'backbone'):
        return BackboneExport(model)
    if backbone_only:
        return BackboneExport(model.backbone)
    if hasattr(model, 'decode_head'):
        return SegmentorExport(model, seg_output)
    if hasattr(model, 'rpn_head') or hasattr(model, 'bbox_head'):
        return DetectorExport(model)
    raise NotImplementedError(f'no export wrapper for {type(model).__name__}: export its '
                              'backbone with backbone_only=True (--backbone-only)')


def load_model(config: Union[str, Config], checkpoint: Optional[str] = None,
               cfg_options: Optional[dict] = None, backbone_only: bool = False) -> nn.Module:
    """Build ``config``'s model in its ``default_scope`` on CPU and load ``checkpoint``.

    A bare Twins backbone, or with ``backbone_only`` a model's Twins backbone, loads a
    checkpoint of any supported layout (authors', mmseg, mmpretrain, mmtwins; a whole model's
    too, whose backbone is taken); the rest of the model then keeps random weights. Any other
    model loads its own (mmengine) checkpoint strictly. Without a checkpoint the weights stay
    random (good for checking an export, not for using it).

    Returns:
        nn.Module: the model, in eval mode.

    Raises:
        FileNotFoundError: ``checkpoint`` is not a file (said before the model is built).
        CheckpointError: the checkpoint does not fit the model (the keys that differ are named);
            nothing is loaded then.
    """
    if checkpoint is not None:
        check_checkpoint_file(checkpoint)  # before the build, which takes a while
    model = build_module(load_config(config, cfg_options))
    if checkpoint is None:
        return model
    backbone = model if isinstance(model, Twins) else getattr(model, 'backbone', None)
    if isinstance(backbone, Twins) and (backbone is model or backbone_only):
        load_twins_checkpoint(backbone, checkpoint, strict=True)
        return model
    model.load_state_dict(fitting_state_dict(model, read_checkpoint(checkpoint), checkpoint))
    return model
