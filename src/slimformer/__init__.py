"""slimformer: make Transformer models smaller and faster at a measured cost in quality.

    import slimformer
    report = slimformer.compress("smollm2-135m", "recipes/default.yaml", output="out/smol")
    model = slimformer.load("out/smol")

Importing slimformer changes no global state (no backend flags, no patched objects).
"""

from slimformer.api import compress, evaluate, load
from slimformer.errors import UserError
from slimformer.recipe import Recipe

__all__ = ["compress", "evaluate", "load", "Recipe", "UserError"]
__version__ = "0.1.0"
