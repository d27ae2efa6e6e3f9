"""Local 🤗 Evaluate modules for CAD-MTL, loadable offline.

```python
import evaluate
from cadmtl.evaluation.hub_metric import CADMTL_METRICS_PATH

detection = evaluate.load(CADMTL_METRICS_PATH, "detection")
```

The module folder holds one script that delegates to `cadmtl.evaluation.metrics`, so both give the same
numbers. `evaluate.load` copies the script into its modules cache (`HF_MODULES_CACHE`) before importing it, which is
why the script imports `modeling_cadmtl` absolutely: the package must be installed.
"""

from pathlib import Path

__all__ = ["CADMTL_METRICS_PATH"]

CADMTL_METRICS_PATH: str = str(Path(__file__).resolve().parent / "cadmtl_metrics")
"""Absolute path of the `cadmtl_metrics` evaluate module folder (configs: classification, detection, segmentation)."""
