# ImageNet-1k weights of the Twins backbones, used by every detection and segmentation config:
# the ONE place to point at your files (defaults: the authors' release file names under
# checkpoints/twins/). Any layout mmtwins' loader reads works and is converted on load (authors'
# release, timm, mmseg 1.x, mmpretrain 1.x, mmtwins). For one run instead:
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
# and to train from scratch: --cfg-options model.backbone.init_cfg=None
twins_imagenet = dict(
    pcpvt_s='checkpoints/twins/pcpvt_small.pth',
    pcpvt_b='checkpoints/twins/pcpvt_base.pth',
    pcpvt_l='checkpoints/twins/pcpvt_large.pth',
    svt_s='checkpoints/twins/alt_gvt_small.pth',
    svt_b='checkpoints/twins/alt_gvt_base.pth',
    svt_l='checkpoints/twins/alt_gvt_large.pth')
