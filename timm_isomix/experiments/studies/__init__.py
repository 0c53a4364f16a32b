"""The registered studies: one module per question."""
from . import adaptation, mixtures, multitask, reuse, routing, sharing, transfer, warmstart  # noqa: F401
