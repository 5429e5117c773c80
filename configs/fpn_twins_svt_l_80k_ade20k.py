# Semantic FPN 80k with Twins-SVT-L on ADE20K (the paper's Table 2: 46.7 mIoU).
_base_ = './fpn_twins_svt_s_80k_ade20k.py'

model = dict(
    backbone=dict(
        arch='large',
        drop_path_rate=0.4,  # the paper's stronger drop path for the L models in this setting
        init_cfg=dict(checkpoint={{_base_.twins_imagenet.svt_l}})),
    neck=dict(in_channels=[128, 256, 512, 1024]))
