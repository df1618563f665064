"""Data: sources (CIFAR-10, image folders, decode cache), in-memory tensors, batch augmentation."""
from .sources import DataBundle, load_data, read_image, IMAGE_EXTENSIONS  # noqa: F401
from .tensors import TensorSplit, channel_stats, stratified_split  # noqa: F401
