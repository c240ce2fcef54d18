"""Front-end validation (patch 2 of `vllm_compat`): an adapter is checked before its request is queued, and before
the load endpoint answers."""

from __future__ import annotations

from ...adapters.spec import served_spec
from . import Replacement


def replacements() -> list[Replacement]:
    return [*_validation(), *_load_endpoint()]


def _validation() -> list[Replacement]:
    from vllm.exceptions import VLLMValidationError
    from vllm.lora.utils import get_adapter_absolute_path
    from vllm.v1.engine.input_processor import InputProcessor

    from ...adapters import AdapterError
    from ..loader import load_for_mode

    original = InputProcessor._validate_lora

    def check_path(self, path) -> None:
        """Load (and in convert mode convert) in this process, cached; raises AdapterError or FileNotFoundError."""
        if not hasattr(self, "_tenfold_spec"):
            self._tenfold_spec = served_spec(self.vllm_config.model_config.hf_config)
        load_for_mode(path, self._tenfold_spec, self.vllm_config.parallel_config.tensor_parallel_size,
                      max_rank=self.lora_config.max_lora_rank, budget_slots=self.lora_config.max_loras)

    def check_adapter(self, lora_request) -> None:
        self._tenfold_check_path(get_adapter_absolute_path(lora_request.lora_path))

    def _validate_lora(self, lora_request):
        original(self, lora_request)
        if lora_request is None:
            return
        try:
            self._tenfold_check_adapter(lora_request)
        except (AdapterError, FileNotFoundError) as e:
            raise VLLMValidationError(f"adapter {lora_request.lora_name!r} cannot be served: {e}",
                                      parameter="lora_request", value=lora_request.lora_name) from None

    return [
        Replacement(InputProcessor, "_tenfold_check_path", check_path, added=True),
        Replacement(InputProcessor, "_tenfold_check_adapter", check_adapter, added=True),
        Replacement(InputProcessor, "_validate_lora", _validate_lora),
    ]


def _load_endpoint() -> list[Replacement]:
    import asyncio
    from http import HTTPStatus

    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve import create_error_response
    from vllm.exceptions import LoRAAdapterNotFoundError
    from vllm.lora.request import LoRARequest

    from ...adapters import AdapterError, AdapterTooLargeError

    original = OpenAIServingModels._check_load_lora_adapter_request

    async def _check_load_lora_adapter_request(self, request):
        error = await original(self, request)
        if error is not None:
            return error
        try:  # reads and validates files: off the event loop, so streams keep flowing
            await asyncio.to_thread(self.input_processor._tenfold_check_adapter,
                                    LoRARequest(request.lora_name, 1, request.lora_path))
        except FileNotFoundError:
            return create_error_response(LoRAAdapterNotFoundError(request.lora_name, request.lora_path))
        except AdapterTooLargeError as e:
            return create_error_response(message=f"adapter {request.lora_name!r} cannot be served: {e}",
                                         err_type="RequestEntityTooLarge",
                                         status_code=HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        except AdapterError as e:
            return create_error_response(message=f"adapter {request.lora_name!r} cannot be served: {e}",
                                         err_type="BadRequestError", status_code=HTTPStatus.BAD_REQUEST)
        return None

    return [Replacement(OpenAIServingModels, "_check_load_lora_adapter_request", _check_load_lora_adapter_request)]
