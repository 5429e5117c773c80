# The paper's 1x detection schedule (section 4.3): mmdet's 12 epochs with 500 iterations of linear
# warm-up and lr x0.1 at epochs 8 and 11, with AdamW (lr 1e-4, weight decay 1e-4) for batch 16.
_base_ = 'mmdet::_base_/schedules/schedule_1x.py'

optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, weight_decay=1e-4),
    # No weight decay on the PEG position encodings and on LayerNorms (not in the paper's text,
    # which names no exemptions; as its Swin-style 3x recipe): these are mmtwins' real module
    # names ('norm' matches norm1/norm2, attn.norm, patch_embeds.*.norm, stage_norms).
    paramwise_cfg=dict(custom_keys={
        'pos_block': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.)
    }))
# mmdet's auto_scale_lr=dict(enable=False, base_batch_size=16) is inherited: the paper's 8 GPUs x 2
# images. `tools/train.py --auto-scale-lr` scales the lr for another total batch.
