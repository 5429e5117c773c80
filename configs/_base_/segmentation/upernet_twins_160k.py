# UperNet with an auxiliary FCN head on a Twins backbone in the Swin setting (paper Sec. 4.2):
# 160k iterations, batch 16, AdamW lr 6e-5, weight decay 0.01, 1500-iteration linear warm-up then
# linear decay to zero, drop path 0.2. A config on top sets the backbone's type, arch and
# ImageNet checkpoint and the heads' in_channels (the auxiliary head reads stage 3, index 2).
_base_ = [
    'mmseg::_base_/models/upernet_swin.py', './ade20k.py', './runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
    '../twins_dense_backbone.py',  # the backbone settings and ImageNet checkpoints
]
crop_size = (512, 512)
model = dict(
    data_preprocessor=dict(size=crop_size),  # pad training crops to 512x512
    backbone=dict(_delete_=True, **_base_.twins_dense_backbone),
    decode_head=dict(num_classes=150),
    auxiliary_head=dict(num_classes=150))

# Position encodings (PEG) and LayerNorms have no weight decay.
optimizer = dict(
    _delete_=True, type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01)
optim_wrapper = dict(
    optimizer=optimizer,
    paramwise_cfg=dict(custom_keys={
        'pos_block': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.)
    }))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0., power=1.0, begin=1500, end=160000, by_epoch=False)
]

# Crash-safe checkpoints (written to a temporary file, then renamed; a damaged latest checkpoint
# is skipped on --resume) and test metrics written once by rank 0 (all ranks share the log dir).
# Set here, not in runtime.py: they change the default_hooks of mmseg's schedule.
default_hooks = dict(checkpoint=dict(type='mmtwins.AtomicCheckpointHook'),
                     logger=dict(type='mmtwins.AtomicLoggerHook'))
