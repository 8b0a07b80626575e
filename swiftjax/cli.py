"""``swiftjax <command> ...``: a thin table from command names to the functions that run them.

Experiment commands take ``[CONFIG.yaml] [key=value ...]``; see configs/.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    # name: (module:function, help)
    "demo": ("swiftjax.methods.swift.pipeline:demo_main", "the main job: `swift run configs/demo.yaml` (world task)"),
    "sample": ("swiftjax.methods.swift.pipeline:sample_main", "sample N candidates per problem (resumable shards)"),
    "swift": ("swiftjax.methods.swift.pipeline:main", "swift run|train|score|bon CONFIG [k=v ...]: SWIFT on any model/task"),
    "ablate": ("swiftjax.methods.swift.ablate:main", "run every config of an ablation folder, write a markdown table"),
    "ebrm": ("swiftjax.methods.ebrm.pipeline:main", "ebrm run CONFIG: EBRM over a reward model and over SWIFT"),
    "genarm": ("swiftjax.methods.genarm.pipeline:main", "genarm train|guide CONFIG: autoregressive RM, guided decoding"),
    "preference": ("swiftjax.methods.preference.pipeline:main", "preference irft|mrpo CONFIG: SFT/IRFT/RFT, DPO/MRPO"),
    "world": ("swiftjax.world.model:main", "world train|export [CONFIG]: the embedded world's model"),
    "plan": ("swiftjax.plan:main", "plan [CONFIG] model=.. mesh.data=.. mesh.model=..: per-device memory, no weights read"),
    "convert": ("swiftjax.cli:_convert", "convert llama2c|gguf SRC DST: a llama2.c checkpoint or a GGUF file to an HF directory"),
    "models": ("swiftjax.convert.fetch:main", "models fetch [NAME ...]: download real GGUF checkpoints, convert to HF (cache)"),
}


def _convert(argv):
    if argv and argv[0] == "llama2c":
        from swiftjax.convert.llama2c import main_convert

        return main_convert(argv)
    if argv and argv[0] == "gguf":
        from swiftjax.convert.gguf import main_convert as main_convert_gguf

        return main_convert_gguf(argv)
    raise SystemExit("usage: swiftjax convert llama2c SRC DST [--tokenizer TOK] [--overwrite]\n"
                     "       swiftjax convert gguf SRC.gguf DST [--dtype float32|bfloat16] [--overwrite]")


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
