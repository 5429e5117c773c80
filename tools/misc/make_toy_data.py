# Write the toy data set of the main job in the COCO and ADE20K layouts (see --help for the layout):
# python tools/misc/make_toy_data.py [--out data/toy] [--num-train 400] [--num-val 100] [--size 128]
from mmtwins.demo.toy_data import main

if __name__ == '__main__':
    main()
