"""Pretrained weights on the Hugging Face Hub: publishing (`python -m timm_isomix.hub.publish`), and the
loading API of `timm_isomix.models._hub` under its public name."""
from ..models._hub import (
    ALLOW_PICKLE_ENV, DEFAULT_ORG, ORG_ENV, PickledWeightsError, PretrainedWeightsError, WeightsNotPublishedError,
    allow_pickled_weights, check_state_dict, check_weights_file, hub_org, pickled_weights_allowed, pretrained_kwargs,
    publish_command, published_cfg, published_repo_id)

__all__ = [
    'ORG_ENV', 'DEFAULT_ORG', 'ALLOW_PICKLE_ENV', 'PretrainedWeightsError', 'WeightsNotPublishedError',
    'PickledWeightsError', 'hub_org', 'published_repo_id', 'published_cfg', 'publish_command',
    'allow_pickled_weights', 'pickled_weights_allowed', 'check_weights_file', 'check_state_dict',
    'pretrained_kwargs',
]
