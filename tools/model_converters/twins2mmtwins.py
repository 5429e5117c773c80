# Convert Twins weights of any layout (authors/timm, mmseg 1.x, mmpretrain 1.x) to mmtwins' names,
# ready for init_cfg=dict(type='Pretrained', checkpoint=DST); see mmtwins/checkpoint.py:
#   python tools/model_converters/twins2mmtwins.py SRC DST [--prefix backbone.] [--keep-head]
# The loader runs the same renaming on any layout, so converting first is optional.
from mmtwins.checkpoint import main

if __name__ == '__main__':
    main()
