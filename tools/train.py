# Train with any OpenMMLab 3.x config (mmdet, mmseg, mmpretrain scopes), see mmtwins/apis/train.py:
#   python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp] [--auto-scale-lr]
#                         [--cfg-options KEY=VALUE ...] [--launcher none|pytorch|slurm|mpi]
from mmtwins.apis.train import main

if __name__ == '__main__':
    main()
