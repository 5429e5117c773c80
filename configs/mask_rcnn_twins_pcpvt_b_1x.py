# Mask R-CNN 1x with Twins-PCPVT-B on COCO (the paper's Table 4: 44.6 box AP, 40.9 mask AP).
_base_ = './_base_/det_mask_rcnn_twins_1x.py'

model = dict(
    backbone=dict(
        type='mmtwins.PCPVT',
        arch='base',
        init_cfg=dict(checkpoint={{_base_.twins_imagenet.pcpvt_b}})),
    neck=dict(in_channels=[64, 128, 320, 512]))
