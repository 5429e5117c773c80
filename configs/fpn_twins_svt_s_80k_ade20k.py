# Semantic FPN 80k with Twins-SVT-S on ADE20K (the paper's Table 2: 43.2 mIoU).
_base_ = './_base_/segmentation/fpn_twins_80k.py'

model = dict(
    backbone=dict(
        type='mmtwins.SVT',
        arch='small',
        init_cfg=dict(checkpoint={{_base_.twins_imagenet.svt_s}})),
    neck=dict(in_channels=[64, 128, 256, 512]))
