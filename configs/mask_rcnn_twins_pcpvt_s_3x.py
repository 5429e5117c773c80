# Mask R-CNN 3x + MS with Twins-PCPVT-S on COCO (the paper's Table 4: 46.8 box AP, 42.6 mask AP).
_base_ = './_base_/det_mask_rcnn_twins_3x.py'

model = dict(
    backbone=dict(
        type='mmtwins.PCPVT',
        arch='small',
        init_cfg=dict(checkpoint={{_base_.twins_imagenet.pcpvt_s}})),
    neck=dict(in_channels=[64, 128, 320, 512]))
