# RetinaNet 3x + MS: 36 epochs, shorter side drawn from 480-800 (longer side <= 1333).
_base_ = ['./det_retinanet_twins.py', './det_twins_schedule_3x.py']

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomResize', scale=[(1333, 480), (1333, 800)], keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
