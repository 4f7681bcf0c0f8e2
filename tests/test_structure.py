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


def test_huggingface_hub_is_imported_only_by_a_hub_call():
    """An optional dependency (the `hub` extra): importing the package, and every model class, must not need it."""
    code = "import sys, mmgen_pytorch; print('huggingface_hub' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT).stdout
    assert out.split() == ["False"]


def test_objective_interface_is_exported_from_the_top_level():
    import mmgen_pytorch
    from mmgen_pytorch import ContinuousObjective, GaussianObjective, RectifiedFlow
    from mmgen_pytorch.objectives import base, flow, gaussian

    assert (ContinuousObjective, GaussianObjective, RectifiedFlow) == \
        (base.ContinuousObjective, gaussian.GaussianObjective, flow.RectifiedFlow)
    assert {"ContinuousObjective", "GaussianObjective", "RectifiedFlow"} <= set(mmgen_pytorch.__all__)
    assert issubclass(RectifiedFlow, ContinuousObjective) and issubclass(GaussianObjective, ContinuousObjective)


def test_dnd_is_llamagen_with_depth_heads_through_public_pieces_only():
    """DnDTransformer builds its DepthHeads and passes them on; everything else is LlamaGen's, through the
    heads' interface: it overrides no private method, and LlamaGen has no switch for it."""
    from mmgen_pytorch.code_heads import CodeHeads, DepthHeads, NextCodeHead
    from mmgen_pytorch.dnd import DnDTransformer
    from mmgen_pytorch.llamagen import LlamaGen

    private = sorted(name for name, value in vars(DnDTransformer).items()
                     if name.startswith("_") and name != "__init__" and callable(getattr(value, "__func__", value)))
    assert private == [], private
    assert not hasattr(LlamaGen, "final_head")
    assert issubclass(NextCodeHead, CodeHeads) and issubclass(DepthHeads, CodeHeads)


def test_monoformer_is_transfusion_wired_with_other_pieces():
    """MonoFormer chooses Transfusion's pieces (objective, time injection, modality record, enums) and
    overrides no method of it; Transfusion carries no MonoFormer-only string option."""
    import inspect

    from mmgen_pytorch import MonoFormer, Transfusion

    overridden = sorted(name for name, value in vars(MonoFormer).items()
                        if callable(value) and name != "__init__" and hasattr(Transfusion, name))
    assert overridden == [], overridden
    options = set(inspect.signature(Transfusion.__init__).parameters)
    assert not options & {"flat_positions", "text_loss_on_modality_rows", "time_sampling", "ode_method"}
    assert not hasattr(Transfusion, "flow") and not hasattr(Transfusion, "_build_modality_layers")
