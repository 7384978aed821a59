"""advmoe.models: the dense and MoE model zoo (``create_model``, ``list_models``).

Importing this package registers every architecture.
"""

from advmoe.models import densenet, resnet, vgg, wrn  # noqa: F401  (importing registers the models)
from advmoe.models.common import ModelSpec
from advmoe.models.registry import create_model, list_models, register_model

__all__ = ["ModelSpec", "create_model", "list_models", "register_model"]
