# ADE20K (ADEChallengeData2016 layout, 150 classes) on mmseg's base: images rescaled around
# 2048x512 (ratio 0.5-2.0), 512x512 crops, flip and photometric distortion for training; test at
# 2048x512 (single scale) or 0.5-1.75 x 2048x512 with flip (--tta).
_base_ = 'mmseg::_base_/datasets/ade20k.py'

# The data set root, set here only (or link your copy to ./data/ade/ADEChallengeData2016):
#   images/{training,validation}/*.jpg, annotations/{training,validation}/*.png
data_root = 'data/ade/ADEChallengeData2016'

img_scale = (2048, 512)
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    # After Resize: the ground truth stays at the original size. Data without annotations
    # (a data_prefix without seg_map_path) pass, for format_only prediction maps.
    dict(type='mmtwins.LoadOptionalAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
# Multi-scale + flip test as the paper (as mmseg 0.x): scales are ratios of img_scale. mmseg
# 1.2.2's own tta_pipeline scales the original image instead, and its LoadAnnotations fails on
# data without annotations (KeyError: 'seg_map_path').
img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='TestTimeAug',
        transforms=[
            [
                dict(type='Resize', scale=(int(img_scale[0] * r), int(img_scale[1] * r)),
                     keep_ratio=True) for r in img_ratios
            ],
            [
                dict(type='RandomFlip', prob=0., direction='horizontal'),
                dict(type='RandomFlip', prob=1., direction='horizontal')
            ],
            [dict(type='mmtwins.LoadOptionalAnnotations', reduce_zero_label=True)],
            [dict(type='PackSegInputs')],
        ])
]

# 8 GPUs x 2 images = the paper's batch of 16.
train_dataloader = dict(batch_size=2, dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
