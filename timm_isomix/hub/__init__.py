"""Pretrained weights on the Hugging Face Hub: publishing (`python -m timm_isomix.hub.publish`), and the
loading API of `timm_isomix.models._hub` under its public name."""
from ..models._hub import (
    DEFAULT_ORG, ORG_ENV, PickledWeightsError, PretrainedWeightsError, WeightsNotPublishedError, check_state_dict,
    check_weights_file, hub_org, pretrained_kwargs, publish_command, published_cfg, published_repo_id)

__all__ = [
    'ORG_ENV', 'DEFAULT_ORG', 'PretrainedWeightsError', 'WeightsNotPublishedError', 'PickledWeightsError',
    'hub_org', 'published_repo_id', 'published_cfg', 'publish_command', 'check_weights_file', 'check_state_dict',
    'pretrained_kwargs',
]
