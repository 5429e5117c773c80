# What every mmtwins config (classification, detection, segmentation) adds to its framework's
# runtime: mmtwins' modules registered, and a stop, naming the iteration, when the loss turns
# NaN/inf. Only keys that no mmpretrain/mmdet/mmseg base defines live here, so this file is listed
# beside those bases (mmengine refuses a key defined by two bases of one file). The crash-safe
# checkpoint and logger hooks change `default_hooks`, which the framework's runtime (mmseg: its
# schedule) defines, so they are set in the file that inherits that base.
custom_imports = dict(imports=['mmtwins.models'], allow_failed_imports=False)
custom_hooks = [dict(type='mmtwins.NonFiniteLossHook')]
