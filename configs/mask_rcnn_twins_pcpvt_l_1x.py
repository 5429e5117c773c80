# Mask R-CNN 1x with Twins-PCPVT-L on COCO (the paper: supplement only).
_base_ = './_base_/det_mask_rcnn_twins_1x.py'

model = dict(
    backbone=dict(
        type='mmtwins.PCPVT',
        arch='large',
        init_cfg=dict(checkpoint={{_base_.twins_imagenet.pcpvt_l}})),
    neck=dict(in_channels=[64, 128, 320, 512]))
