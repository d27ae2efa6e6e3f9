"""Multi-task training of CadMtl on one CPU, one GPU or many: the entry point the README and the model card name.

    accelerate launch train_accelerate.py                         # the built-in CPU demo (tiny DINOv3, cad100k-mini)
    accelerate launch train_accelerate.py --config configs/cad100k_dinov3_vitb16_adaptive.yaml
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml train_accelerate.py --config ... --paradigm base
    python train_accelerate.py --help                             # every argument (cadmtl/training/arguments.py)

The loop itself lives in the package, `cadmtl/training/loop.py` (set-up, step, evaluate and keep best, finish),
so an installed cad-mtl trains the same way without this file: `cadmtl train ...` runs
`accelerate launch -m cadmtl.training.loop ...` with the same arguments and gives the same run.
"""

from __future__ import annotations

from cadmtl.training.loop import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
