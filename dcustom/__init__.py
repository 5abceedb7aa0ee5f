"""dcustom: customize text-to-image diffusion models.

The public API is re-exported lazily so that `import dcustom` (and `dcustom --help`) stays instant
and never imports torch.
"""

from dcustom.version import __version__  # noqa: F401

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

from dcustom.lazy import lazy_exports  # noqa: E402

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
