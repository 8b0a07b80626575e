"""``swiftjax <command> ...``: a thin table from command names to the functions that run them.

Experiment commands take ``[CONFIG.yaml] [key=value ...]``; see configs/.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    # name: (module:function, help)
    "convert": ("swiftjax.cli:_convert", "convert llama2c SRC DST: a llama2.c checkpoint to an HF directory"),
    "world": ("swiftjax.experiments.world:main", "world train|sample|export [CONFIG] [k=v ...]: the embedded world"),
    "demo": ("swiftjax.experiments.demo:main", "the main job: world model -> candidates -> SWIFT -> Best-of-N report"),
    "train-swift": ("swiftjax.experiments.swift_run:train_main", "train a SWIFT head on a candidate set"),
    "score": ("swiftjax.experiments.swift_run:score_main", "score candidates with a trained head (--refine: EBRM)"),
    "bon": ("swiftjax.experiments.swift_run:bon_main", "Best-of-N table of a scored candidate set"),
    "ablate": ("swiftjax.experiments.ablate:main", "run every config of an ablation folder, write a markdown table"),
    "train-ebrm": ("swiftjax.experiments.ebrm_run:main", "EBRM on an explicit RM and on SWIFT in the world"),
    "train-arm": ("swiftjax.experiments.genarm_run:train_main", "train an autoregressive reward model"),
    "guide": ("swiftjax.experiments.genarm_run:guide_main", "GenARM guided decoding experiments"),
    "train-irft": ("swiftjax.experiments.policy_run:irft_main", "SFT vs IRFT vs RFT in the world"),
    "train-mrpo": ("swiftjax.experiments.policy_run:mrpo_main", "DPO vs MRPO in the world"),
}


def _convert(argv):
    from swiftjax.convert.llama2c import main_convert

    if not argv or argv[0] != "llama2c":
        raise SystemExit("usage: swiftjax convert llama2c SRC DST [--tokenizer TOK] [--overwrite]")
    return main_convert(argv)


def _usage() -> str:
    lines = ["usage: swiftjax <command> [args]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"swiftjax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from swiftjax.train.distributed import maybe_initialize

    maybe_initialize()  # multi-host only when the environment asks for it
    target, _ = COMMANDS[name]
    mod, fn = target.split(":")
    try:
        result = getattr(importlib.import_module(mod), fn)(rest)
    except ValueError as e:  # bad input: a clear message, not a traceback
        print(f"swiftjax {name}: error: {e}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
