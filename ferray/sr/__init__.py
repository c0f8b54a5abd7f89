"""SRGAN x2 for the faces: networks, losses, quality metrics and the training engine (Ray-free)."""
