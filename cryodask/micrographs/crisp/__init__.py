"""CRISP: micrograph segmentation (choice of network and loss), dense-CRF refinement, particle extraction."""
