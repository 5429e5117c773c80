# Mask R-CNN 1x with Twins-SVT-L on COCO (the paper: supplement only).
_base_ = './_base_/det_mask_rcnn_twins_1x.py'

model = dict(
    backbone=dict(
        type='mmtwins.SVT',
        arch='large',
        init_cfg=dict(checkpoint={{_base_.twins_imagenet.svt_l}})),
    neck=dict(in_channels=[128, 256, 512, 1024]))
