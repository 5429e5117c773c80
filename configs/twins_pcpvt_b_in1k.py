# Twins-PCPVT-B on ImageNet-1k, 300 epochs (the paper's Table 1: 82.7 top-1).
_base_ = './_base_/cls_twins_in1k.py'

model = dict(
    backbone=dict(type='mmtwins.PCPVT', arch='base', drop_path_rate=0.3),
    head=dict(in_channels=512))
