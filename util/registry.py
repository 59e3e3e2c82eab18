"""Models registered by name, with a helpful error for unknown names."""
import difflib
from typing import Callable

import torch.nn as nn


class ModelRegistry:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._constructors: dict[str, Callable[..., nn.Module]] = {}

    def register(self, *names: str) -> Callable:
        def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
            for name in (fn.__name__, *names):
                self._constructors[name] = fn
            return fn
        return add

    def names(self) -> list[str]:
        return sorted(self._constructors)

    def create(self, name: str, **kwargs) -> nn.Module:
        if name not in self._constructors:
            close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.4)
            hint = f"did you mean {', '.join(close)}?" if close else f"choose one of {', '.join(self.names())}"
            raise ValueError(f"unknown {self.kind} model '{name}' (--model): {hint}")
        return self._constructors[name](**kwargs)
