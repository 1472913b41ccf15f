"""One function per public operation: pydantic request in, pydantic response out, one backend call.

REST routes and gRPC handlers are thin adapters around these, so both transports validate, answer and
fail in exactly the same way.
"""

from __future__ import annotations

import contextlib

import numpy as np

from service import metrics
from service.api import schemas
from service.backends.base import Backend
from service.engines.memory.registry import DynamicsOptions, check_bank_name


class Operations:
    def __init__(self, backend: Backend):
        self.backend = backend

    async def create_bank(self, bank: str, request: schemas.CreateBank) -> schemas.BankInfo:
        check_bank_name(bank)
        info = await self.backend.create_bank(bank, request.kind, request.dim, request.params)
        return schemas.BankInfo.model_validate(info, from_attributes=True)

    async def list_banks(self) -> schemas.BankList:
        banks = await self.backend.list_banks()
        for info in banks:
            metrics.BANK_PATTERNS.labels(info.name).set(info.count)
        return schemas.BankList(banks=[schemas.BankInfo.model_validate(b, from_attributes=True) for b in banks])

    async def get_bank(self, bank: str) -> schemas.BankInfo:
        check_bank_name(bank)
        info = await self.backend.bank_info(bank)
        metrics.BANK_PATTERNS.labels(bank).set(info.count)
        return schemas.BankInfo.model_validate(info, from_attributes=True)

    async def delete_bank(self, bank: str) -> None:
        check_bank_name(bank)
        await self.backend.delete_bank(bank)
        with contextlib.suppress(KeyError):  # no gauge yet for a bank never listed or stored to
            metrics.BANK_PATTERNS.remove(bank)

    async def store(self, bank: str, request: schemas.StoreRequest) -> schemas.StoreResponse:
        check_bank_name(bank)
        ids, count = await self.backend.store(bank, np.asarray(request.patterns, dtype=np.float32), request.ids)
        metrics.BANK_PATTERNS.labels(bank).set(count)
        return schemas.StoreResponse(ids=ids, count=count)

    async def delete_pattern(self, bank: str, pattern_id: str) -> None:
        check_bank_name(bank)
        await self.backend.delete_pattern(bank, pattern_id)

    async def retrieve(self, bank: str, request: schemas.RetrieveRequest) -> schemas.RetrieveResponse:
        return await self._run(bank, request, None)

    async def complete(self, bank: str, request: schemas.CompleteRequest) -> schemas.RetrieveResponse:
        return await self._run(bank, request, np.asarray(request.mask, dtype=bool))

    async def complete_image(self, request: schemas.CompleteImageRequest) -> schemas.CompleteImageResponse:
        image, trace = await self.backend.complete_image(
            np.asarray(request.image, dtype=np.float32), np.asarray(request.mask, dtype=bool), request.steps)
        return schemas.CompleteImageResponse(model=request.model, image=image.tolist(), energy_trace=trace)

    async def models(self) -> schemas.ModelList:
        return schemas.ModelList(data=[schemas.ModelCard(**card) for card in await self.backend.models()])

    async def _run(self, bank: str, request: schemas.DynamicsRequest, clamp: np.ndarray | None
                   ) -> schemas.RetrieveResponse:
        check_bank_name(bank)
        options = DynamicsOptions(request.steps, request.step_size, request.tolerance, request.trace)
        results = await self.backend.run_memory(bank, np.asarray(request.queries, dtype=np.float32), clamp, options)
        steps = metrics.RETRIEVE_STEPS.labels(bank)
        for result in results:
            steps.observe(result.steps)
        return schemas.RetrieveResponse(results=[r.to_dict() for r in results])
