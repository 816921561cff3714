"""Networks: backbones by timm name (`create_model`, offline weights), the dropout head, the
fine-tuning net (frozen trunk, trained tail) and the multi-block linear model.

>>> from vldlib.model import create_model, build_net
>>> net = build_net(create_model("test_resnet", 3, pretrained=False, dropout=0.9))
"""

from vldlib.model.backbones import (
                                    ALIASES,
                                    backbone_depth_name,
                                    check_backbone,
                                    create_model,
                                    data_config,
                                    depth_name,
                                    model_stages,
                                    native_resolution,
                                    suggest_backbones,
                                    weights_fingerprint,
)
from vldlib.model.head import ModelConfigError, attach_dropout, check_dropout, dropout_rate, head_logits
from vldlib.model.multiblock import MultiBlockNet, residual_units
from vldlib.model.nets import HEADS, FineTuneNet, build_net, check_head, param_groups

__all__ = ["ALIASES", "HEADS", "FineTuneNet", "ModelConfigError", "MultiBlockNet", "attach_dropout", "backbone_depth_name",
           "build_net", "check_backbone", "check_dropout", "check_head", "create_model", "data_config", "depth_name", "dropout_rate",
           "head_logits", "model_stages", "native_resolution", "param_groups", "residual_units", "suggest_backbones",
           "weights_fingerprint"]
