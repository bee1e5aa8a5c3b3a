"""Post-processing of segmentation masks: connected components, filters, bridge removal."""
