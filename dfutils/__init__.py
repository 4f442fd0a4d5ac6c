"""dfutils: the tested core of the deepfake-detection notebooks.

Labels everywhere: fake = 1, real = 0; every probability is P(fake).
"""

__version__ = "0.1.0"

LABELS = {"real": 0, "fake": 1}
CLASSES = ("real", "fake")
