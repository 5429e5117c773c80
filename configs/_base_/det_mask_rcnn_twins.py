# Mask R-CNN with a Twins backbone on COCO (mmdet's Mask R-CNN, data and runtime; FPN on all four
# stages). Each top-level config sets the backbone variant, its ImageNet checkpoint and the FPN's
# in_channels. mmdet has no test-time augmentation for masks, so there is no tta_model here.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/default_runtime.py',
    './twins_imagenet.py',
]
custom_imports = dict(imports=['mmtwins.models'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained')))

# Crash-safe checkpoints (written to a temporary file, then renamed; a damaged latest checkpoint
# is skipped on --resume), test metrics written once by rank 0 (all ranks share the log dir)
# and a stop, naming the iteration, when the loss turns NaN/inf.
default_hooks = dict(checkpoint=dict(type='mmtwins.AtomicCheckpointHook'),
                     logger=dict(type='mmtwins.AtomicLoggerHook'))
custom_hooks = [dict(type='mmtwins.NonFiniteLossHook')]
