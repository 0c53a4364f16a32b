"""The registered studies: one module per question."""
from . import adaptation, mixtures, multitask, reuse, transfer, warmstart  # noqa: F401
