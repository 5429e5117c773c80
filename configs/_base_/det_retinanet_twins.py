# RetinaNet with a Twins backbone on COCO (mmdet's RetinaNet, data and runtime). The FPN of mmdet's
# RetinaNet is already the PVT/Twins one: stages 1-3 (start_level=1) plus two extra convs on the
# input (add_extra_convs='on_input'), 5 levels. Each top-level config sets the backbone variant,
# its ImageNet checkpoint and the FPN's in_channels.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/default_runtime.py',
    'mmdet::retinanet/retinanet_tta.py',  # multi-scale + flip test (tools/test.py --tta)
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
