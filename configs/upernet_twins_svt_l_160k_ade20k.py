# UperNet 160k with Twins-SVT-L on ADE20K (the paper's Table 2: 48.8 mIoU, 50.2 multi-scale).
_base_ = './upernet_twins_svt_s_160k_ade20k.py'

model = dict(
    backbone=dict(
        arch='large',
        init_cfg=dict(checkpoint={{_base_.twins_imagenet.svt_l}})),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
