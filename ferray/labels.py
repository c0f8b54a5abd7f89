"""FER2013's labels, in its order everywhere (Ray-free, no dependencies: models import it)."""

EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
NUM_CLASSES = len(EMOTIONS)
FER_SIZE = 48  # FER2013 faces are 48x48 grayscale
