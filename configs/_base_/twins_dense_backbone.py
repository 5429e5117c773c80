# The backbone settings every detection and segmentation config shares: all four stages out,
# drop path 0.2 (the paper's setting for dense prediction; the L segmentors raise it), and the
# ImageNet weights of twins_imagenet.py, whose path each top-level config picks with its type and
# arch. A model base uses it as backbone=dict(_delete_=True, **_base_.twins_dense_backbone),
# replacing its base model's ResNet/Swin backbone.
_base_ = './twins_imagenet.py'

twins_dense_backbone = dict(
    out_indices=(0, 1, 2, 3), drop_path_rate=0.2, init_cfg=dict(type='Pretrained'))
