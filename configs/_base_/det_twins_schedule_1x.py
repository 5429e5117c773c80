# The paper's 1x detection schedule (section 4.3, the PVT setting): mmdet's 12 epochs with 500
# iterations of linear warm-up and lr x0.1 at epochs 8 and 11, with AdamW (lr 1e-4, weight decay
# 1e-4 on every parameter, as in the authors' 1x configs) for batch 16.
_base_ = 'mmdet::_base_/schedules/schedule_1x.py'

optim_wrapper = dict(optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, weight_decay=1e-4))
# mmdet's auto_scale_lr=dict(enable=False, base_batch_size=16) is inherited: the paper's 8 GPUs x 2
# images. `tools/train.py --auto-scale-lr` scales the lr for another total batch.
