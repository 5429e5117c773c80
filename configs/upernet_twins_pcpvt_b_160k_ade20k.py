# UperNet 160k with Twins-PCPVT-B on ADE20K (the paper's Table 2: 47.1 mIoU, 48.4 multi-scale).
_base_ = './upernet_twins_pcpvt_s_160k_ade20k.py'

model = dict(
    backbone=dict(
        arch='base',
        init_cfg=dict(checkpoint={{_base_.twins_imagenet.pcpvt_b}})))
