# The main job (`make demo`): toy data, then train, evaluate and draw a Twins-SVT detector and
# segmentor on CPU, all under --out-dir (default work_dirs/demo). See mmtwins/demo/pipeline.py.
from mmtwins.demo.pipeline import main

if __name__ == '__main__':
    main()
