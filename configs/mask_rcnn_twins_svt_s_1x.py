# Mask R-CNN 1x with Twins-SVT-S on COCO (the paper's Table 4: 43.4 box AP, 40.3 mask AP).
_base_ = './_base_/det_mask_rcnn_twins_1x.py'

model = dict(
    backbone=dict(
        type='mmtwins.SVT',
        arch='small',
        init_cfg=dict(checkpoint={{_base_.twins_imagenet.svt_s}})),
    neck=dict(in_channels=[64, 128, 256, 512]))
