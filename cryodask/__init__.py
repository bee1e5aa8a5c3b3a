"""cryodask: membrane segmentation and particle picking for cryo-ET/cryo-EM collections on Dask."""

from .errors import CryodaskError, InputError

__version__ = "0.1.0"

__all__ = ["CryodaskError", "InputError", "__version__"]
