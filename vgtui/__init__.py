"""vgtui: watch gradients vanish and explode, layer by layer, while a network trains."""

__version__ = "0.1.0"
