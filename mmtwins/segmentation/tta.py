"""Test-time augmentation for mmseg segmentors: the views of an image merged into one prediction."""
from typing import List

from mmengine.model import BaseTTAModel
from mmengine.structures import PixelData
from mmseg.structures import SegDataSample

from mmtwins.registry import MODELS

# Meta keys of one augmented view (not of the original image), dropped from the merged sample.
VIEW_META_KEYS = ('img_shape', 'pad_shape', 'scale_factor', 'flip', 'flip_direction',
                  'padding_size', 'img_padding_size', 'batch_input_shape')


@MODELS.register_module()
class SegTTAModel(BaseTTAModel):
    """Multi-scale / flip test of an mmseg segmentor: class probabilities averaged over views.

    Use it as ``tta_model=dict(type='mmtwins.SegTTAModel')`` with a ``tta_pipeline`` made of
    ``TestTimeAug`` (``tools/test.py --tta`` wraps the config's model in it). The segmentor
    already undoes each view's flip and resizes its ``seg_logits`` to the original image size,
    so all views of an image share one (C, H, W) shape.

    Differences from mmseg 1.2.2's ``SegTTAModel``:

    - the merged sample is a new :class:`SegDataSample` carrying the original image's meta
      (``img_path``, ``ori_shape``, ``reduce_zero_label``, ...), not the last view's sample
      with its flip, scale and shape and its own stale ``seg_logits``;
    - for a binary head (``out_channels == 1``) the segmentor's ``seg_logits`` already hold
      sigmoid probabilities: they are averaged as they are, not passed through a second sigmoid.

    As there, ``gt_sem_seg`` is kept where the data set has annotations, so unannotated test
    sets (``format_only``) work too.

    Returns per image a sample with ``pred_sem_seg`` of shape (1, H, W) (class indices, int64,
    or 0/1 for a binary head) at the original image size.
    """

    def merge_preds(self, data_samples_list: List[List[SegDataSample]]) -> List[SegDataSample]:
        """Merge the views of each image.

        Args:
            data_samples_list: one list per image with one :class:`SegDataSample` per view,
                each with ``seg_logits`` of shape (C, H, W).

        Returns:
            One merged :class:`SegDataSample` per image.
        """
        return [self._merge_views(views) for views in data_samples_list]

    def _merge_views(self, views: List[SegDataSample]) -> SegDataSample:
        # mmseg's postprocess_result stores sigmoid probabilities for a binary head.
        binary = views[0].seg_logits.data.shape[0] == 1
        # Summed view by view: a few (C, H, W) tensors alive at once, never all V views'.
        probs = sum(v.seg_logits.data if binary else v.seg_logits.data.softmax(dim=0)
                    for v in views) / len(views)
        if binary:
            pred = (probs > self.module.decode_head.threshold).long()
        else:
            pred = probs.argmax(dim=0, keepdim=True)
        first = views[0]
        merged = SegDataSample(metainfo={k: v for k, v in first.metainfo.items()
                                         if k not in VIEW_META_KEYS})
        merged.pred_sem_seg = PixelData(data=pred)
        if hasattr(first, 'gt_sem_seg'):
            merged.gt_sem_seg = first.gt_sem_seg
        return merged
