# Mask R-CNN 1x: 12 epochs, single scale 1333x800, AdamW lr 2e-4 (as PVT), weight decay 1e-4.
_base_ = ['./det_mask_rcnn_twins.py', './det_twins_schedule_1x.py']

optim_wrapper = dict(optimizer=dict(lr=2e-4))
