# Mask R-CNN with a Twins backbone on COCO (mmdet's Mask R-CNN, data and runtime; FPN on all four
# stages). Each top-level config sets the backbone variant, its ImageNet checkpoint and the FPN's
# in_channels. mmdet has no test-time augmentation for masks, so there is no tta_model here.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    './det_twins_runtime.py',  # mmdet's runtime, mmtwins' modules and hooks
    './twins_dense_backbone.py',  # the backbone settings and ImageNet checkpoints
]

model = dict(backbone=dict(_delete_=True, **_base_.twins_dense_backbone))
