# Mask R-CNN 3x + MS: the 3x recipe of det_twins_schedule_3x.py on Mask R-CNN.
_base_ = ['./det_mask_rcnn_twins.py', './det_twins_schedule_3x.py']

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    {{_base_.ms_crop_resize}},
    dict(type='PackDetInputs')
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
