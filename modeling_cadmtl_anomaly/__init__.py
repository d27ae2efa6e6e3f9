"""cad-mtl's normal-only anomaly models as a self-contained Hub package: the patch-memory scorer and the
from-scratch multi-task learner (inference), their configs and their image processor.

Importing the package registers the classes with the transformers Auto classes, so `AutoModel.from_pretrained(DIR)`
uses this installed code; without the package, `AutoModel.from_pretrained(DIR, trust_remote_code=True)` runs the
flat code files `save_pretrained` writes next to the weights.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .configuration_cadmtl_anomaly import AnomalyLearnerConfig, PatchMemoryConfig
from .image_processing_cadmtl_anomaly import AnomalyImageProcessor
from .learner_cadmtl_anomaly import AnomalyLearnerModel
from .modeling_cadmtl_anomaly import AnomalyOutput, AnomalyPreTrainedModel, PatchMemoryModel

for _config, _model in ((PatchMemoryConfig, PatchMemoryModel), (AnomalyLearnerConfig, AnomalyLearnerModel)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoImageProcessor.register(
        _config, image_processor_classes={"torchvision": AnomalyImageProcessor}, exist_ok=True
    )

__all__ = [
    "AnomalyImageProcessor",
    "AnomalyLearnerConfig",
    "AnomalyLearnerModel",
    "AnomalyOutput",
    "AnomalyPreTrainedModel",
    "PatchMemoryConfig",
    "PatchMemoryModel",
]
