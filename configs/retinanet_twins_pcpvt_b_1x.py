# RetinaNet 1x with Twins-PCPVT-B on COCO (the paper's Table 3: 44.3 box AP).
_base_ = './_base_/det_retinanet_twins_1x.py'

model = dict(
    backbone=dict(
        type='mmtwins.PCPVT',
        arch='base',
        init_cfg=dict(checkpoint={{_base_.twins_imagenet.pcpvt_b}})),
    neck=dict(in_channels=[64, 128, 320, 512]))
