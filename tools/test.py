# Evaluate a checkpoint with any OpenMMLab 3.x config, see mmtwins/apis/test.py:
#   python tools/test.py CONFIG CHECKPOINT [--tta] [--out FILE.pkl | DIR] [--work-dir DIR]
#                        [--show] [--show-dir DIR] [--wait-time S] [--interval N]
#                        [--cfg-options KEY=VALUE ...] [--launcher none|pytorch|slurm|mpi]
from mmtwins.apis.test import main

if __name__ == '__main__':
    main()
