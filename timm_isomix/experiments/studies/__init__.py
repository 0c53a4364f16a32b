"""The registered studies: one module per question."""
from . import mixtures, reuse  # noqa: F401
