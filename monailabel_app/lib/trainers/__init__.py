from .medurwkv import MedURWKVTrain  # noqa: F401
from .progress import TrainProgress  # noqa: F401
