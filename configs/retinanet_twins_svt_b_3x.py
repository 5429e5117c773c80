# RetinaNet 3x + MS with Twins-SVT-B on COCO (the paper's Table 3: 46.9 box AP).
_base_ = './_base_/det_retinanet_twins_3x.py'

model = dict(
    backbone=dict(
        type='mmtwins.SVT',
        arch='base',
        init_cfg=dict(checkpoint={{_base_.twins_imagenet.svt_b}})),
    neck=dict(in_channels=[96, 192, 384, 768]))
