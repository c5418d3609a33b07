"""The MoRA tuner: finds the target nn.Linear layers of a model and wraps each in a MoraLinear."""

from __future__ import annotations

import torch

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from models.mora.config import MoraConfig
from models.mora.layer import MoraLayer, MoraLinear


class MoraModel(BaseTuner):
    """Injects MoRA adapters into `model` on the modules named by `MoraConfig.target_modules`.

    Normally reached through `peft.get_peft_model(model, MoraConfig(...))` once `models.mora` is imported.
    """

    prefix: str = "mora_"
    tuner_layer_cls = MoraLayer
    # MoRA replaces LoRA one for one, so it defaults to the same modules LoRA does.
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self, mora_config: MoraConfig, adapter_name, target, target_name, parent, current_key, **optional_kwargs
    ):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        kwargs = {"r": mora_config.r, "mora_type": mora_config.mora_type, "mora_dropout": mora_config.mora_dropout}
        if isinstance(target, MoraLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        new_module = self._create_new_module(mora_config, adapter_name, target, **kwargs)
        if adapter_name not in self.active_adapters:
            # an additional adapter is not trainable until it is made active
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(mora_config: MoraConfig, adapter_name, target, **kwargs):
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base_layer, torch.nn.Linear):
            raise TypeError(f"Target module {target} is not supported by MoRA; only torch.nn.Linear is.")
        return MoraLinear(target, adapter_name, **kwargs)
