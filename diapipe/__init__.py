"""diapipe: difference-imaging pipeline for finding astronomical transients.

Each stage is one module usable from Python (Exposure in, Exposure out) and
from the ``diapipe`` command line; the Snakemake workflow calls the same code.
"""

from .exposure import Exposure, MaskedImage
from .psf import PixelPsf
from .butler import Butler, get

__all__ = ["Exposure", "MaskedImage", "PixelPsf", "Butler", "get"]
__version__ = "0.1.0"
