from __future__ import annotations

import pytest

from service.config import Settings
from tests.harness import ROOT


@pytest.fixture(scope="session", autouse=True)
def exported_llm() -> None:
    """The gateways under test serve the default LM from the model repository (Triton loads it from
    there; the embedded backend prefers it to the GGUF): convert it once if `amserve export` has not."""
    from service.triton.export import export_llm, llm_exported

    repository = ROOT / Settings.from_env().model_repository
    if not llm_exported(repository):
        export_llm(repository, progress=False)
