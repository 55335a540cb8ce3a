"""Model backends, chosen by ``--model NAME[:PATH_OR_HUB_ID]``."""

from __future__ import annotations

from s2s.backends.base import Backend, ModelStream, StepResult

__all__ = ["Backend", "ModelStream", "StepResult", "UnknownModelError", "load_backend"]


class UnknownModelError(ValueError):
    pass


async def load_backend(spec: str) -> Backend:
    """Load the backend named by ``spec`` (``echo``, or ``NAME:PATH_OR_HUB_ID``)."""
    name, _, _location = spec.partition(":")
    match name:
        case "echo":
            from s2s.backends.echo import EchoBackend

            return EchoBackend()
        case _:
            raise UnknownModelError(f"unknown model {spec!r}; available: echo")
