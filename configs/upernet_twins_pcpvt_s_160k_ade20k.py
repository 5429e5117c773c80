# UperNet 160k with Twins-PCPVT-S on ADE20K (the paper's Table 2: 46.2 mIoU, 47.5 multi-scale).
_base_ = './_base_/segmentation/upernet_twins_160k.py'

model = dict(
    backbone=dict(
        type='mmtwins.PCPVT',
        arch='small',
        init_cfg=dict(checkpoint={{_base_.twins_imagenet.pcpvt_s}})),
    decode_head=dict(in_channels=[64, 128, 320, 512]),
    auxiliary_head=dict(in_channels=320))
