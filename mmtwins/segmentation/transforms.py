"""Data transforms for semantic segmentation test sets with or without ground truth."""
from mmseg.datasets.transforms import LoadAnnotations

from mmtwins.registry import TRANSFORMS


@TRANSFORMS.register_module()
class LoadOptionalAnnotations(LoadAnnotations):
    """mmseg's ``LoadAnnotations`` that lets samples without a segmentation map pass.

    The data set decides: a sample whose data info has a ``seg_map_path`` gets its map loaded
    exactly as by ``LoadAnnotations`` (``results['gt_seg_map']``, (H, W) uint8, reduced by one
    when ``reduce_zero_label``); a sample without one (a test set without annotations, i.e. a
    dataset whose ``data_prefix`` has no ``seg_map_path``) is returned unchanged. One test or
    TTA pipeline thus serves the validation set (mIoU) and an unannotated test set
    (``test_evaluator.format_only=True``: prediction maps only).
    """

    def transform(self, results: dict) -> dict:
        if results.get('seg_map_path') is None:
            return results
        return super().transform(results)
