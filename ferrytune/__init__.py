"""ferrytune: fine-tune language models larger than the accelerator that trains them."""

from ferrytune.errors import FerrytuneError

__version__ = "0.1.0"
__all__ = ["FerrytuneError", "__version__"]
