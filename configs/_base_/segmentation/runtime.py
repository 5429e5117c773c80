# mmseg's runtime plus what every mmtwins segmentation config shares.
_base_ = 'mmseg::_base_/default_runtime.py'

custom_imports = dict(imports=['mmtwins.models', 'mmtwins.segmentation'],
                      allow_failed_imports=False)

# --tta wraps the model in this: unlike mmseg 1.2.2's SegTTAModel, the merged prediction carries
# the original image's meta (not the last view's) and binary heads are merged correctly; see
# mmtwins/segmentation/tta.py.
tta_model = dict(type='mmtwins.SegTTAModel')

# Both settings train with 16 images per iteration; `--auto-scale-lr` rescales the learning
# rate linearly to another total batch.
auto_scale_lr = dict(enable=False, base_batch_size=16)
