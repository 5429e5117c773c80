# UperNet 160k with Twins-PCPVT-L on ADE20K (the paper's Table 2: 48.6 mIoU, 49.8 multi-scale).
_base_ = './upernet_twins_pcpvt_s_160k_ade20k.py'

model = dict(
    backbone=dict(
        arch='large',
        init_cfg=dict(checkpoint={{_base_.twins_imagenet.pcpvt_l}})))
