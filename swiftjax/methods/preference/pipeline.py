"""``swiftjax preference irft|mrpo CONFIG [key=value ...]``: the two preference drivers on any
(Backbone, Task).

    swiftjax preference irft configs/irft.yaml [key=value ...]   # SFT vs IRFT vs RFT (irft.py)
    swiftjax preference mrpo configs/mrpo.yaml [key=value ...]   # DPO vs MRPO (mrpo.py)

Each command's configuration is a frozen dataclass (:class:`IRFTRunConfig`,
:class:`MRPORunConfig`) whose field defaults are the only defaults; the YAML file and the
``key=value`` overrides only override them, and are checked (unknown keys, types, choices)
before any work starts. The output folder is checked writable before any work.
"""
from __future__ import annotations

from swiftjax.config import parse_typed, subcommand
from swiftjax.parallel import use_mesh
from swiftjax.methods.preference.irft import IRFTRunConfig, run_irft
from swiftjax.methods.preference.mrpo import MRPORunConfig, run_mrpo

__all__ = ["IRFTRunConfig", "MRPORunConfig", "run_irft", "run_mrpo", "irft_main", "mrpo_main", "main"]


def irft_main(argv) -> int:
    """``swiftjax preference irft [CONFIG.yaml] [key=value ...]``."""
    cfg = parse_typed(IRFTRunConfig, argv, "preference irft")
    with use_mesh(cfg.mesh):
        run_irft(cfg)
    return 0


def mrpo_main(argv) -> int:
    """``swiftjax preference mrpo [CONFIG.yaml] [key=value ...]``."""
    cfg = parse_typed(MRPORunConfig, argv, "preference mrpo")
    with use_mesh(cfg.mesh):
        run_mrpo(cfg)
    return 0


def main(argv) -> int:
    """``swiftjax preference irft|mrpo CONFIG [k=v ...]``."""
    return subcommand("preference", {"irft": irft_main, "mrpo": mrpo_main}, argv)
