"""dfutils: the tested core of the deepfake-detection notebooks.

Labels everywhere: fake = 1, real = 0 (`dfutils.datasets.LABELS`, by the class folders'
names); every probability is P(fake).
"""

__version__ = "0.1.0"
