import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

GOLDEN_DIR = Path(os.environ.get("MMGEN_GOLDEN_DIR", Path(__file__).resolve().parents[2] / "shared" / "golden"))

# `HYPOTHESIS_PROFILE=thorough pytest` runs many more examples than CI does.
settings.register_profile("ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def golden():
    def load(name: str):
        path = GOLDEN_DIR / name
        if not path.exists():
            pytest.skip(f"golden file {path} is absent: put the shared/golden folder beside the repository "
                        f"or set MMGEN_GOLDEN_DIR")
        return torch.load(path, weights_only=True)
    return load


if os.environ.get("MMGEN_TOLERANCE_AUDIT"):  # see TOLERANCES.md
    import _tolerance_audit

    _tolerance_audit.install(os.environ["MMGEN_TOLERANCE_AUDIT"])
