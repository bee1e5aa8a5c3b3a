"""Synthetic tomograms and micrographs with ground truth, for tests, benchmarks and metrics.

Dense matter (lipid, protein, ice) is dark (low values) in every image, as in real data.
"""

from .micrograph import SynthMicrograph, synth_micrograph, write_micrograph
from .tomogram import SynthTomogram, synth_tomogram, write_tomogram

__all__ = ["SynthMicrograph", "SynthTomogram", "synth_micrograph", "synth_tomogram", "write_micrograph",
           "write_tomogram"]
