"""Registered model builders (plain PyTorch, no Ray)."""

from ferray.models.registry import build_model, keras_params, list_models, model_entry, num_params, register_model

__all__ = ["build_model", "keras_params", "list_models", "model_entry", "num_params", "register_model"]
