# mmdet's runtime plus what every mmtwins detection config shares: crash-safe checkpoints (written
# to a temporary file, then renamed; a damaged latest checkpoint is skipped on --resume) and test
# metrics written once by rank 0 (all ranks share the log dir).
_base_ = ['mmdet::_base_/default_runtime.py', './twins_runtime.py']

default_hooks = dict(checkpoint=dict(type='mmtwins.AtomicCheckpointHook'),
                     logger=dict(type='mmtwins.AtomicLoggerHook'))
