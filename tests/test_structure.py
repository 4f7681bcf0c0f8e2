"""The package's shape: what the backbone pulls in when imported, and the top-level exports."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# imports the module without running mmgen_pytorch/__init__.py (which imports every model), then lists
# the mmgen_pytorch modules that came with it
IMPORTED_WITH = """
import sys, types
package = types.ModuleType("mmgen_pytorch")
package.__path__ = [sys.argv[1] + "/mmgen_pytorch"]
sys.modules["mmgen_pytorch"] = package
import mmgen_pytorch.backbone.transformer
print(" ".join(sorted(name for name in sys.modules if name.startswith("mmgen_pytorch"))))
"""


def test_backbone_imports_neither_training_state_nor_upstream_key_maps():
    out = subprocess.run([sys.executable, "-c", IMPORTED_WITH, str(ROOT)], check=True, capture_output=True,
                         text=True).stdout.split()
    assert "mmgen_pytorch.saving" in out  # Transformer is Checkpointable
    assert not [name for name in out if "checkpoint" in name or "pretrained" in name], out


def test_objective_interface_is_exported_from_the_top_level():
    import mmgen_pytorch
    from mmgen_pytorch import ContinuousObjective, GaussianObjective, RectifiedFlow
    from mmgen_pytorch.objectives import base, flow, gaussian

    assert (ContinuousObjective, GaussianObjective, RectifiedFlow) == \
        (base.ContinuousObjective, gaussian.GaussianObjective, flow.RectifiedFlow)
    assert {"ContinuousObjective", "GaussianObjective", "RectifiedFlow"} <= set(mmgen_pytorch.__all__)
    assert issubclass(RectifiedFlow, ContinuousObjective) and issubclass(GaussianObjective, ContinuousObjective)
