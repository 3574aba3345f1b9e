"""The four model families of the thesis as plain torch modules, built by one factory.

    from cspine_ray.models import create_model
    model = create_model("sequence_classifier", backbone="convnext_tiny", sequence_head="gru")

Registered models and the family each serves (`cspine_ray.train.families` says the same as data):

| family        | registered model(s)                          | input -> output                         |
|---------------|----------------------------------------------|-----------------------------------------|
| `cnn3d`       | "cnn3d"                                       | volume (B,1,D,H,W) -> (B,8) C1..C7, patient |
| `single_head` | "slice_classifier" x2: A visibility, B fracture | slice (B,3,H,W) -> (B,7)              |
| `multi_head`  | "multi_head"                                  | slice -> {"presence": (B,7), "fracture": (B,7)} |
| `two_stage`   | "slice_locator" (stage 1), "sequence_classifier" (stage 2) | slice -> (B,11); steps (B,L,3,H,W) -> (B,) |

All outputs are logits. The top-N patient rule is in `aggregate`; backbones are any timm name (`backbone`); sequence heads ("lstm", "gru",
"transformer") and attention pooling are in `sequence`.
"""

# the family modules register their models on import
from cspine_ray.models import cnn3d, locator, multi_head, sequence_classifier, slice_classifier  # noqa: F401
from cspine_ray.models.aggregate import patient_overall
from cspine_ray.models.backbone import PretrainedWeightsError, create_backbone
from cspine_ray.models.locator import decode_locator, split_locator_outputs
from cspine_ray.models.registry import create_model, list_models, register_model
from cspine_ray.models.sequence import SEQUENCE_HEADS, AttentionPooling, create_sequence_head

__all__ = [
    "SEQUENCE_HEADS", "AttentionPooling", "PretrainedWeightsError", "create_backbone",
    "create_model", "create_sequence_head", "decode_locator", "list_models", "patient_overall",
    "register_model", "split_locator_outputs",
]
