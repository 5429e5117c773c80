# Export a config's model (backbone, segmentor or detector) to ONNX and check it with ONNX Runtime:
#   python tools/deployment/pytorch2onnx.py CONFIG [CHECKPOINT] --shape H W [--dynamic] \
#       [--verify H W ...]
# See mmtwins/deployment/pytorch2onnx.py and the README's Deployment section.
from mmtwins.deployment.pytorch2onnx import main

if __name__ == '__main__':
    main()
