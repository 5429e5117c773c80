# Semantic FPN 80k with Twins-PCPVT-S on ADE20K (the paper's Table 2: 44.3 mIoU).
_base_ = './_base_/segmentation/fpn_twins_80k.py'

model = dict(
    backbone=dict(
        type='mmtwins.PCPVT',
        arch='small',
        init_cfg=dict(checkpoint={{_base_.twins_imagenet.pcpvt_s}})),
    neck=dict(in_channels=[64, 128, 320, 512]))
