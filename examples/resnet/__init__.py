from ..vision import ResNetModule, SyntheticImages

__all__ = ["ResNetModule", "SyntheticImages"]
