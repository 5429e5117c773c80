# The main job's segmentor (tools/demo.py, `make demo`): Semantic FPN 80k with Twins-SVT-S, with
# only the data, the schedule and the model size changed: a 4-stage SVT of 1.5 M parameters
# trained from scratch (no ImageNet weights) with a narrow FPN and head (1.9 M in all; plain BN,
# as gloo has no SyncBN on CPUs), the toy shapes at 128x128.
# Data: `python tools/misc/make_toy_data.py` (writes data/toy/ade/ADEChallengeData2016/).
_base_ = '../fpn_twins_svt_s_80k_ade20k.py'

# Model size.
embed_dims = [32, 64, 128, 256]
crop_size = (128, 128)
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    data_preprocessor=dict(size=crop_size),
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
    decode_head=dict(in_channels=[64] * 4, channels=64, num_classes=4, norm_cfg=norm_cfg))

# Data: the toy ADE20K-layout set. Label maps hold 0 (other, ignored), 1 background and 2-4 the
# shapes; reduce_zero_label maps them to 255 and 0-3. A generic mmseg data set, since
# ADE20KDataset accepts only subsets of ADE20K's 150 class names.
data_root = 'data/toy/ade/ADEChallengeData2016'
dataset = dict(
    type='BaseSegDataset',
    data_root=data_root,
    metainfo=dict(
        classes=('background', 'rectangle', 'circle', 'triangle'),
        palette=[(128, 128, 128), (220, 50, 50), (40, 180, 60), (50, 90, 230)]),
    img_suffix='.jpg',
    seg_map_suffix='.png',
    reduce_zero_label=True)
img_scale = (512, 128)  # ADE20K's 2048x512 divided by 4: the 128x128 images stay as they are
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=img_scale, ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='mmtwins.LoadOptionalAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]  # --tta: as the real config, with flips
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
train_dataloader = dict(
    batch_size=8,
    num_workers=1,
    dataset=dict(dataset, pipeline=train_pipeline))
val_dataloader = dict(
    num_workers=1,
    dataset=dict(dataset, pipeline=test_pipeline))
test_dataloader = val_dataloader

# Schedule: the 80k schedule's poly decay over 500 iterations of batch 8, AdamW at lr 1e-3 for a
# model trained from scratch; validation every 100 iterations (the mIoU curve), one checkpoint.
max_iters = 500
train_cfg = dict(max_iters=max_iters, val_interval=100)
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = [
    dict(type='PolyLR', eta_min=0., power=0.9, begin=0, end=max_iters, by_epoch=False)
]
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(interval=max_iters))
randomness = dict(seed=0)  # the demo's numbers reproduce from run to run
