# RetinaNet 1x: 12 epochs, single scale 1333x800, AdamW lr 1e-4, weight decay 1e-4, batch 16.
_base_ = ['./det_retinanet_twins.py', './det_twins_schedule_1x.py']
