# Convert an ImageNet Twins checkpoint WITH its head (the authors', timm's or an mmpretrain 1.x
# classifier) into the mmpretrain ImageClassifier checkpoint of configs/twins_*_in1k.py, see
# mmtwins/classification/convert.py:
#   python tools/model_converters/twins2mmpretrain.py SRC DST
from mmtwins.classification.convert import main

if __name__ == '__main__':
    main()
