# Mask R-CNN 1x with Twins-SVT-B on COCO (the paper's Table 4: 45.2 box AP, 41.5 mask AP).
_base_ = './_base_/det_mask_rcnn_twins_1x.py'

model = dict(
    backbone=dict(
        type='mmtwins.SVT',
        arch='base',
        init_cfg=dict(checkpoint={{_base_.twins_imagenet.svt_b}})),
    neck=dict(in_channels=[96, 192, 384, 768]))
