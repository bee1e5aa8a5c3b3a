"""Synthetic tomograms and micrographs with ground truth, for tests, benchmarks and metrics.

Dense matter (lipid, protein, ice) is dark (low values) in every image, as in most real data
(``--polarity bright`` writes a tomogram negated). Two tomogram generators share one output
contract: ``synth_tomogram`` filters a density in Fourier space; ``synth_projection_tomogram``
simulates a tilt series and reconstructs it, so methods can be checked on one they were not tuned on.
"""

from .micrograph import SynthMicrograph, synth_micrograph, write_micrograph
from .projection import synth_projection_tomogram
from .tomogram import SynthTomogram, synth_tomogram, write_tomogram

__all__ = ["SynthMicrograph", "SynthTomogram", "synth_micrograph", "synth_projection_tomogram", "synth_tomogram",
           "write_micrograph", "write_tomogram"]
