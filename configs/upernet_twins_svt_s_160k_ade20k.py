# UperNet 160k with Twins-SVT-S on ADE20K (the paper's Table 2: 46.2 mIoU, 47.1 multi-scale).
_base_ = './_base_/segmentation/upernet_twins_160k.py'

model = dict(
    backbone=dict(
        type='mmtwins.SVT',
        arch='small',
        init_cfg=dict(checkpoint={{_base_.twins_imagenet.svt_s}})),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))
