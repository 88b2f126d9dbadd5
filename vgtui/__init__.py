"""vgtui: watch gradients vanish and explode, layer by layer, while a network trains."""

__version__ = "0.1.0"

# The library API is loaded on first use: `import vgtui` (and `vgtui --help`) must not import torch.
_LAZY = {"watch": "vgtui.api", "Watcher": "vgtui.api", "default_layers": "vgtui.api",
         "LayerSpec": "vgtui.layers"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vgtui' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
