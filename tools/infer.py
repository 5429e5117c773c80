# Run a trained detector or segmentor on images or folders:
#   python tools/infer.py CONFIG CHECKPOINT INPUT [INPUT ...] [--out-dir DIR] [--device cpu|cuda:0]
#       [--score-thr 0.3] [--batch-size 1] [--cfg-options KEY=VALUE ...]
# writes DIR/vis/NAME.png and DIR/pred/NAME.json|png. See mmtwins/demo/inference.py.
from mmtwins.demo.inference import main

if __name__ == '__main__':
    main()
