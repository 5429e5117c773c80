# Twins-PCPVT-S on ImageNet-1k, 300 epochs (the paper's Table 1: 81.2 top-1).
_base_ = './_base_/cls_twins_in1k.py'

model = dict(
    backbone=dict(type='mmtwins.PCPVT', arch='small', drop_path_rate=0.2),
    head=dict(in_channels=512))
