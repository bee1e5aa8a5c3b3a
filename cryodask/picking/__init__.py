"""Particle picking in tomograms: picks (z, y, x voxel centres and a score) from a volume.

``log`` is the LoG blob picker: it needs no weights, so it is the embedded default and the
EMAN2-like baseline the learned pickers are compared with.
"""
