from .module import GPT2Module, SyntheticText

__all__ = ["GPT2Module", "SyntheticText"]
