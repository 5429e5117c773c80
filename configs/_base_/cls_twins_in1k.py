# ImageNet-1k classification with a Twins backbone: the paper's recipe (section 4.1), which is
# DeiT's. 300 epochs at a total batch of 1024 (8 GPUs x 128; auto_scale_lr rescales the lr for
# other totals), AdamW lr 1e-3, weight decay 0.05, 5 linear warm-up epochs then cosine decay to
# zero, gradient clipping at max norm 5.0, RandAugment, Mixup 0.8 / CutMix 1.0, label smoothing
# 0.1, random erasing 0.25. No weight decay on norms, biases and the PEG position encodings.
# Each top-level config sets the backbone variant, its drop path and the head's in_channels.
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    'mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py',
    'mmpretrain::_base_/default_runtime.py',
    './twins_runtime.py',  # mmtwins' modules, the stop on a NaN/inf loss
]

# ImageNet-1k: train/ and val/ with one folder per class (ImageFolder), or flat folders listed
# in meta/{train,val}.txt. The ONE place to point at it (or, per run: --cfg-options
# train_dataloader.dataset.data_root=DIR val_dataloader.dataset.data_root=DIR
# test_dataloader.dataset.data_root=DIR).
data_root = 'data/imagenet'
# pinned memory, persistent workers and stacked batches, as mmpretrain's tools/train.py and
# test.py set them on every loader whose config does not
train_dataloader = dict(batch_size=128, dataset=dict(data_root=data_root), pin_memory=True,
                        persistent_workers=True, collate_fn=dict(type='default_collate'))
val_dataloader = dict(dataset=dict(data_root=data_root), pin_memory=True,
                      persistent_workers=True, collate_fn=dict(type='default_collate'))
test_dataloader = val_dataloader

model = dict(
    type='ImageClassifier',
    backbone=dict(
        out_indices=(3, ),
        # the authors' final LayerNorm, applied per token before the pooling
        norm_after_stage=[False, False, False, True]),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
        init_cfg=dict(type='TruncNormal', layer='Linear', std=.02, bias=0.)),
    train_cfg=dict(augments=[dict(type='Mixup', alpha=0.8), dict(type='CutMix', alpha=1.0)]))

optim_wrapper = dict(
    paramwise_cfg=dict(
        _delete_=True,
        norm_decay_mult=0.,
        bias_decay_mult=0.,
        custom_keys={'pos_block': dict(decay_mult=0.)}),
    clip_grad=dict(max_norm=5.0))

param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, end=5, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=0., by_epoch=True, begin=5, end=300,
         convert_to_iter_based=True),
]

# Crash-safe checkpoints (written to a temporary file, then renamed; a damaged latest checkpoint
# is skipped on --resume) and test metrics written once by rank 0 (all ranks share the log dir).
# Of the 300 epochs' checkpoints (with optimizer state, 0.3-1.2 GB each) the newest 3 are kept.
default_hooks = dict(checkpoint=dict(type='mmtwins.AtomicCheckpointHook', max_keep_ckpts=3),
                     logger=dict(type='mmtwins.AtomicLoggerHook'))
