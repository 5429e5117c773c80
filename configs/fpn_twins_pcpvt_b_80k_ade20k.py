# Semantic FPN 80k with Twins-PCPVT-B on ADE20K (the paper's Table 2: 44.9 mIoU).
_base_ = './fpn_twins_pcpvt_s_80k_ade20k.py'

model = dict(
    backbone=dict(
        arch='base',
        init_cfg=dict(checkpoint={{_base_.twins_imagenet.pcpvt_b}})))
