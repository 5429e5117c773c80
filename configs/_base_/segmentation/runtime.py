# mmseg's runtime plus what every mmtwins segmentation config shares (but the crash-safe
# checkpoint and logger hooks, which change the default_hooks of mmseg's schedule: fpn_twins_80k.py
# and upernet_twins_160k.py set them).
_base_ = ['mmseg::_base_/default_runtime.py', '../twins_runtime.py']

# mmtwins' segmentation modules (SegTTAModel, LoadOptionalAnnotations) besides its models.
custom_imports = dict(imports=_base_.custom_imports.imports + ['mmtwins.segmentation'])

# --tta wraps the model in this: unlike mmseg 1.2.2's SegTTAModel, the merged prediction carries
# the original image's meta (not the last view's) and binary heads are merged correctly; see
# mmtwins/segmentation/tta.py.
tta_model = dict(type='mmtwins.SegTTAModel')

# Both settings train with 16 images per iteration; `--auto-scale-lr` rescales the learning
# rate linearly to another total batch.
auto_scale_lr = dict(enable=False, base_batch_size=16)
