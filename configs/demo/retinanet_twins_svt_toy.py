# The main job's detector (tools/demo.py, `make demo`): RetinaNet 1x with Twins-SVT-S, with only
# the data, the schedule and the model size changed: a 4-stage SVT of 1.5 M parameters trained
# from scratch (no ImageNet weights) with a narrow FPN and head (2.0 M in all), the toy shapes at
# 128x128, on CPUs.
# Data: `python tools/misc/make_toy_data.py` (writes data/toy/coco/).
_base_ = '../retinanet_twins_svt_s_1x.py'

# Model size.
embed_dims = [32, 64, 128, 256]
model = dict(
    backbone=dict(
        arch=dict(
            _delete_=True,
            embed_dims=embed_dims,
            num_heads=[1, 2, 4, 8],
            mlp_ratios=[4, 4, 4, 4],
            depths=[1, 1, 2, 1],
            sr_ratios=[8, 4, 2, 1],
            window_sizes=[8, 8, 8, 8]),
        drop_path_rate=0.,
        init_cfg=None),
    neck=dict(in_channels=embed_dims, out_channels=64),
    bbox_head=dict(num_classes=3, in_channels=64, feat_channels=64, stacked_convs=2))

# Data: the toy COCO set (3 classes, 128x128 images).
data_root = 'data/toy/coco/'
metainfo = dict(
    classes=('rectangle', 'circle', 'triangle'),
    palette=[(220, 50, 50), (40, 180, 60), (50, 90, 230)])
img_scale = (128, 128)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
# --tta: the toy images at 0.75x, 1x and 1.5x, each with and without a flip.
tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='TestTimeAug',
        transforms=[
            [dict(type='Resize', scale=(96, 96), keep_ratio=True),
             dict(type='Resize', scale=img_scale, keep_ratio=True),
             dict(type='Resize', scale=(192, 192), keep_ratio=True)],
            [dict(type='RandomFlip', prob=1.), dict(type='RandomFlip', prob=0.)],
            [dict(type='LoadAnnotations', with_bbox=True)],
            [dict(type='PackDetInputs',
                  meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor',
                             'flip', 'flip_direction'))],
        ])
]
train_dataloader = dict(
    batch_size=8,
    num_workers=1,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8,
    num_workers=1,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

# Schedule: the 1x schedule's 12 epochs (of 50 iterations here: 400 images, batch 8) and its lr
# steps at epochs 8 and 11, with AdamW at lr 1e-3 for a model trained from scratch and a warm-up of
# 100 iterations; validation every 2 epochs (the mAP curve), one checkpoint at the end.
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=100),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1)
]
train_cfg = dict(val_interval=2)
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(interval=12))
randomness = dict(seed=0)  # the demo's numbers reproduce from run to run
