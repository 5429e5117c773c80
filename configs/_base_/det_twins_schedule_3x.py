# The 3x + MS recipe (paper section 4.3, the Swin setting, as in the authors' 3x configs for both
# detectors): 36 epochs, lr x0.1 at epochs 27 and 33, AdamW lr 1e-4 and weight decay 0.05 except
# on the PEG position encodings and the LayerNorms ('norm' matches norm1/norm2, attn.norm,
# patch_embeds.*.norm and stage_norms), and DETR's multi-scale training augmentation below.
_base_ = './det_twins_schedule_1x.py'

max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[27, 33],
         gamma=0.1)
]
optim_wrapper = dict(
    optimizer=dict(weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={
        'pos_block': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.)
    }))

# Multi-scale training (placed after the flip in each detector's train_pipeline): the shorter side
# resized to one of 480, 512, ..., 800 (the longer one at most 1333), or, half of the time, first
# to 400, 500 or 600, then a random crop of 384-600 pixels a side, then resized as before.
ms_scales = [(1333, s) for s in range(480, 801, 32)]
ms_crop_resize = dict(
    type='RandomChoice',
    transforms=[
        [dict(type='RandomChoiceResize', scales=ms_scales, keep_ratio=True)],
        [
            dict(type='RandomChoiceResize', scales=[(1333, 400), (1333, 500), (1333, 600)],
                 keep_ratio=True),
            dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600),
                 allow_negative_crop=True),
            dict(type='RandomChoiceResize', scales=ms_scales, keep_ratio=True),
        ],
    ])
