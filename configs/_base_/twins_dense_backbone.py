# The backbone settings every detection and segmentation config shares: all four stages out,
# drop path 0.2 (the paper's setting for dense prediction; the Semantic FPN L configs raise it to
# 0.4), and the ImageNet weights of twins_imagenet.py, whose path each top-level config picks
# with its type and arch. A model base uses it as
# backbone=dict(_delete_=True, **_base_.twins_dense_backbone), replacing its base model's
# ResNet/Swin backbone. The variable is read when the config is loaded, so change a run's
# backbone through model.backbone (e.g. --cfg-options model.backbone.drop_path_rate=0.3); the
# twins_dense_backbone key left in the final config does nothing.
_base_ = './twins_imagenet.py'

twins_dense_backbone = dict(
    out_indices=(0, 1, 2, 3), drop_path_rate=0.2, init_cfg=dict(type='Pretrained'))
