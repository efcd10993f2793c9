from ..vision import SyntheticImages, ViTModule

__all__ = ["SyntheticImages", "ViTModule"]
