"""cad-mtl: multi-task visual anomaly detection on cars with one DINOv3 backbone and three heads.

Importing the package registers the CadMtl classes with the transformers Auto classes, so
`AutoModel.from_pretrained("cad-mtl/dinov3-b-adaptive")` uses this installed code (no `trust_remote_code`).
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForObjectDetection,
    AutoModelForSemanticSegmentation,
)

from .configuration_cadmtl import CadMtlConfig
from .image_processing_cadmtl import CadMtlImageProcessor
from .modeling_cadmtl import (
    CadMtlForImageClassification,
    CadMtlForObjectDetection,
    CadMtlForSemanticSegmentation,
    CadMtlModel,
    CadMtlObjectDetectionOutput,
    CadMtlOutput,
    CadMtlPreTrainedModel,
)

AutoConfig.register(CadMtlConfig.model_type, CadMtlConfig, exist_ok=True)
AutoModel.register(CadMtlConfig, CadMtlModel, exist_ok=True)
AutoModelForImageClassification.register(CadMtlConfig, CadMtlForImageClassification, exist_ok=True)
AutoModelForObjectDetection.register(CadMtlConfig, CadMtlForObjectDetection, exist_ok=True)
AutoModelForSemanticSegmentation.register(CadMtlConfig, CadMtlForSemanticSegmentation, exist_ok=True)
AutoImageProcessor.register(
    CadMtlConfig, image_processor_classes={"torchvision": CadMtlImageProcessor}, exist_ok=True
)

__version__ = "0.1.0"

__all__ = [
    "CadMtlConfig",
    "CadMtlForImageClassification",
    "CadMtlForObjectDetection",
    "CadMtlForSemanticSegmentation",
    "CadMtlImageProcessor",
    "CadMtlModel",
    "CadMtlObjectDetectionOutput",
    "CadMtlOutput",
    "CadMtlPreTrainedModel",
]
