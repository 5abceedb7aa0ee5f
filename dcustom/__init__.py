"""dcustom: customize text-to-image diffusion models.

The public API is re-exported lazily so that `import dcustom` (and `dcustom --help`) stays instant
and never imports torch.
"""

__version__ = "0.1.0"

# name -> "module:attribute"; resolved on first access.
_LAZY = {
    "load_pipeline": "dcustom.models:load_pipeline",
    "LoadedPipeline": "dcustom.models:LoadedPipeline",
    "generate": "dcustom.generate:generate",
    "GenerateConfig": "dcustom.generate_config:GenerateConfig",
    "load_config": "dcustom.config:load_config",
    "DcustomError": "dcustom.errors:DcustomError",
    "load_adapter": "dcustom.adapters.load:load_adapter",
}


def __getattr__(name):
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'dcustom' has no attribute {name!r}")
    import importlib

    module_name, attr = target.split(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
