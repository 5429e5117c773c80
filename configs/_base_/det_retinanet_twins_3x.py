# RetinaNet 3x + MS: the 3x recipe of det_twins_schedule_3x.py on RetinaNet.
_base_ = ['./det_retinanet_twins.py', './det_twins_schedule_3x.py']

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomFlip', prob=0.5),
    {{_base_.ms_crop_resize}},
    dict(type='PackDetInputs')
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
