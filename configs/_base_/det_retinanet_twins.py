# RetinaNet with a Twins backbone on COCO (mmdet's RetinaNet, data and runtime). The FPN of mmdet's
# RetinaNet is already the PVT/Twins one: stages 1-3 (start_level=1) plus two extra convs on the
# input (add_extra_convs='on_input'), 5 levels. Each top-level config sets the backbone variant,
# its ImageNet checkpoint and the FPN's in_channels.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    './det_twins_runtime.py',  # mmdet's runtime, mmtwins' modules and hooks
    'mmdet::retinanet/retinanet_tta.py',  # multi-scale + flip test (tools/test.py --tta)
    './twins_dense_backbone.py',  # the backbone settings and ImageNet checkpoints
]

model = dict(backbone=dict(_delete_=True, **_base_.twins_dense_backbone))
