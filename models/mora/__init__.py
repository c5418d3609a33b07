"""MoRA (high-rank updating for parameter-efficient fine-tuning) as a peft tuner.

Importing this package registers the method with peft under the name "mora", after which
`get_peft_model`, `PeftModel.save_pretrained` / `from_pretrained` and `merge_and_unload` work
with a `MoraConfig` like with any built-in peft method.
"""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import register_peft_method

from models.mora.config import MORA_PEFT_TYPE, MoraConfig, choose_mora_type
from models.mora.layer import MoraLayer, MoraLinear, mora_rank
from models.mora.model import MoraModel

__all__ = ["MoraConfig", "MoraLayer", "MoraLinear", "MoraModel", "choose_mora_type", "mora_rank"]

# Registration is global and refuses duplicates; guard so a re-import (e.g. importlib.reload) is harmless.
if MORA_PEFT_TYPE not in PEFT_TYPE_TO_CONFIG_MAPPING:
    register_peft_method(name="mora", config_cls=MoraConfig, model_cls=MoraModel)
