"""Micrograph pipelines: Autopick-BC (good/bad particle classifier, sliding-window re-picking)
and CRISP (segmentation with dense-CRF refinement, particles extracted from masks)."""
