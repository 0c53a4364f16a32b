"""The registered studies: one module per question."""
from . import (  # noqa: F401
    adapters_vs_lora, domain_adaptation, mixtures, multitask_learning, reuse, routing_networks, sharing, task_transfer, warmstart)
