# UperNet 160k with Twins-SVT-B on ADE20K (the paper's Table 2: 47.7 mIoU, 48.9 multi-scale).
_base_ = './upernet_twins_svt_s_160k_ade20k.py'

model = dict(
    backbone=dict(
        arch='base',
        init_cfg=dict(checkpoint={{_base_.twins_imagenet.svt_b}})),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
