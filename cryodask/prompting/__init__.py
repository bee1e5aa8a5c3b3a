"""CryoSAM's prompt-based picking: features of a tomogram (``features.py``), one instance per prompt
(``selfprompt.py``, SAM2 driven by ``cryodask.models.sam2_slices``), instances painted into label
volumes (``instances.py``), and a query from the instances matched against the whole volume
(``matching.py``)."""
