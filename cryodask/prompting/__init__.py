"""CryoSAM's prompt-based picking: features of a tomogram, a query from the prompts, and
Hierarchical Feature Matching of the query against the whole volume (``matching.py``)."""
