# Semantic FPN on a Twins backbone in the PVT setting (paper Sec. 4.2): 80k iterations, batch 16,
# AdamW lr 1e-4, poly decay (power 0.9) to zero, drop path 0.2. A config on top sets the
# backbone's type, arch and ImageNet checkpoint and the neck's in_channels.
_base_ = [
    'mmseg::_base_/models/fpn_r50.py', './ade20k.py', './runtime.py',
    'mmseg::_base_/schedules/schedule_80k.py',
    '../twins_dense_backbone.py',  # the backbone settings and ImageNet checkpoints
]
crop_size = (512, 512)
model = dict(
    data_preprocessor=dict(size=crop_size),  # pad training crops to 512x512
    pretrained=None,
    backbone=dict(_delete_=True, **_base_.twins_dense_backbone),
    decode_head=dict(num_classes=150))

# The paper: weight decay 0.0005 "for the whole network" (every parameter, as in PVT's recipe).
# The authors' released configs (and mmseg's ports of them) use 0.0001.
optimizer = dict(
    _delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=5e-4)
optim_wrapper = dict(optimizer=optimizer)
param_scheduler = [
    dict(type='PolyLR', eta_min=0., power=0.9, begin=0, end=80000, by_epoch=False)
]

# Crash-safe checkpoints (written to a temporary file, then renamed; a damaged latest checkpoint
# is skipped on --resume) and test metrics written once by rank 0 (all ranks share the log dir).
# Set here, not in runtime.py: they change the default_hooks of mmseg's schedule.
default_hooks = dict(checkpoint=dict(type='mmtwins.AtomicCheckpointHook'),
                     logger=dict(type='mmtwins.AtomicLoggerHook'))
