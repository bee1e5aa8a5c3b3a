"""Membrane segmentation of tomograms: ETSAM's two-stage SAM2 and a classical sheet filter."""
