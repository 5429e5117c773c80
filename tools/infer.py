# Run a trained detector or segmentor on images: python tools/infer.py CONFIG CHECKPOINT IMAGES_OR_FOLDERS
# [--out-dir DIR] [--device cpu|cuda:0] [--score-thr 0.3]. See mmtwins/demo/inference.py.
from mmtwins.demo.inference import main

if __name__ == '__main__':
    main()
