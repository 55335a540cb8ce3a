"""Model backends, chosen by ``--model NAME[:PATH_OR_HUB_ID]``."""

from __future__ import annotations

from s2s.backends.base import (
    Backend,
    InputTranscribed,
    ModelStream,
    ModelUnavailable,
    ResponseFailed,
    ResponseFinished,
    ResponseRequest,
    Steering,
    StepResult,
    ToolCalled,
)

__all__ = [
    "Backend",
    "InputTranscribed",
    "ModelStream",
    "ModelUnavailable",
    "ResponseFailed",
    "ResponseFinished",
    "ResponseRequest",
    "Steering",
    "StepResult",
    "ToolCalled",
    "UnknownModelError",
    "load_backend",
]


class UnknownModelError(ValueError):
    pass


async def load_backend(
    spec: str,
    device: str | None = None,
    *,
    max_calls: int = 32,
    prompt_tokens: int = 8192,
    prefill_tokens: int = 0,
    cuda_graphs: str = "auto",
) -> Backend:
    """Load the backend named by ``spec`` (``local``, ``echo``, or ``NAME:PATH_OR_HUB_ID``);
    ``max_calls``: the calls a batched model reserves state for (``--max-sessions``);
    ``prompt_tokens``: a turn-based streamed model's prompt budget (``--prompt-tokens``);
    ``prefill_tokens``: its prefill's piece per tick (``--prefill-tokens``, 0: the worker's);
    ``cuda_graphs``: a model worker's CUDA graphs (``--cuda-graphs``)."""
    name, _, location = spec.partition(":")
    match name:
        case "echo":
            from s2s.backends.echo import EchoBackend

            return EchoBackend()
        case "moshi" if location:
            from s2s.backends.moshi import MoshiBackend

            moshi: Backend = await MoshiBackend.load(
                location, device, max_calls=max_calls, cuda_graphs=cuda_graphs
            )
            return moshi
        case "qwen-omni" if location:
            from s2s.backends.qwen_omni import QwenOmniBackend

            qwen: Backend = await QwenOmniBackend.load(location, device)
            return qwen
        case "qwen3-omni" if location:
            from s2s.backends.qwen3_omni import Qwen3OmniBackend

            omni: Backend = await Qwen3OmniBackend.load(
                location, device, max_calls=max_calls, prompt_tokens=prompt_tokens,
                prefill_tokens=prefill_tokens, cuda_graphs=cuda_graphs,
            )  # fmt: skip
            return omni
        case "local":
            from s2s.backends.local import LocalBackend

            backend: Backend = await LocalBackend.load()
            return backend
        case _:
            raise UnknownModelError(
                f"unknown model {spec!r}; available: local, echo, moshi:PATH_OR_HUB_ID, "
                "qwen-omni:PATH_OR_HUB_ID, qwen3-omni:PATH_OR_HUB_ID"
            )
