"""Smoke run of the main job: build Twins-PCPVT-S and Twins-SVT-S and print their outputs."""
import torch

from mmtwins.registry import MODELS


def main():
    import mmtwins.models  # noqa: F401  (registers the backbones)
    x = torch.randn(1, 3, 224, 224)
    for cfg in (dict(type='PCPVT', arch='small'), dict(type='SVT', arch='small')):
        model = MODELS.build(cfg).eval()
        with torch.no_grad():
            outs = model(x)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        shapes = ', '.join(str(tuple(o.shape)) for o in outs)
        print(f"mmtwins.{cfg['type']}-{cfg['arch']}: {params:.2f} M params; "
              f'input {tuple(x.shape)} -> {shapes}')


if __name__ == '__main__':
    main()
