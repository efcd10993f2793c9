from .module import BertQAModule, SyntheticQA

__all__ = ["BertQAModule", "SyntheticQA"]
