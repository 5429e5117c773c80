# RetinaNet 3x + MS with Twins-SVT-S on COCO (the paper's Table 3: 45.6 box AP).
_base_ = './_base_/det_retinanet_twins_3x.py'

model = dict(
    backbone=dict(
        type='mmtwins.SVT',
        arch='small',
        init_cfg=dict(checkpoint={{_base_.twins_imagenet.svt_s}})),
    neck=dict(in_channels=[64, 128, 256, 512]))
