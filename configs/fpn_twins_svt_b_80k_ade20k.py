# Semantic FPN 80k with Twins-SVT-B on ADE20K (the paper's Table 2: 45.3 mIoU).
_base_ = './fpn_twins_svt_s_80k_ade20k.py'

model = dict(
    backbone=dict(
        arch='base',
        init_cfg=dict(checkpoint={{_base_.twins_imagenet.svt_b}})),
    neck=dict(in_channels=[96, 192, 384, 768]))
