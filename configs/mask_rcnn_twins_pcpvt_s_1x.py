# Mask R-CNN 1x with Twins-PCPVT-S on COCO (the paper's Table 4: 42.9 box AP, 40.0 mask AP).
_base_ = './_base_/det_mask_rcnn_twins_1x.py'

model = dict(
    backbone=dict(
        type='mmtwins.PCPVT',
        arch='small',
        init_cfg=dict(checkpoint={{_base_.twins_imagenet.pcpvt_s}})),
    neck=dict(in_channels=[64, 128, 320, 512]))
