"""The ``longreach`` command: train, eval, demo, bench.

    longreach train recipe.yaml a.b=c ...     run a recipe (context extension by default)
    longreach eval  recipe.yaml a.b=c ...     perplexity by length + passkey on the configured model
    longreach demo  [a.b=c ...]               the small end-to-end context-extension run on the embedded default
    longreach bench {train,cp,kernels} ...    benchmarks (table + JSON)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from .config import load_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "recipes" / "configs"


def _split_args(rest: list[str]) -> tuple[Optional[str], list[str]]:
    yaml_path, overrides = None, []
    for a in rest:
        if "=" in a:
            overrides.append(a)
        elif yaml_path is None:
            yaml_path = a
        else:
            raise ConfigError(f"unexpected argument {a!r}: give at most one YAML file, then key=value overrides")
    return yaml_path, overrides


def _resolve_yaml(path: Optional[str]) -> Optional[str]:
    """A YAML path, or the name of a bundled config (e.g. 'demo' -> recipes/configs/demo.yaml)."""
    if path is None or Path(path).exists():
        return path
    bundled = CONFIG_DIR / (path if path.endswith(".yaml") else f"{path}.yaml")
    if bundled.exists():
        return str(bundled)
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config file {path!r} not found; give a YAML path or a bundled config name: {', '.join(names)}")


def _cmd_run(kind: str, rest: list[str]) -> int:
    yaml_path, overrides = _split_args(rest)
    if kind == "demo" and yaml_path is None:
        yaml_path = "demo"
    cfg = load_config(_resolve_yaml(yaml_path), overrides)
    from ..recipes import run_recipe
    from .dist import shutdown_distributed

    run_recipe(cfg, mode=kind)
    shutdown_distributed()  # on success only: a failed rank must not wait in a barrier its peers never reach
    return 0


def _cmd_bench(rest: list[str]) -> int:
    if not rest or rest[0] in ("-h", "--help"):
        print("usage: longreach bench {train,cp,kernels} [options]   (each takes --help)")
        return 0 if rest else 2
    what, args = rest[0], rest[1:]
    if what == "train":
        from .bench.train import main as bench_main
    elif what == "cp":
        from .bench.cp import main as bench_main
    elif what == "kernels":
        if "--linear" in args:
            from .bench.linear import main as bench_main

            args = [a for a in args if a != "--linear"]
        else:
            from .bench.kernels import main as bench_main
    else:
        print(f"unknown benchmark {what!r}; choose train, cp or kernels", file=sys.stderr)
        return 2
    return bench_main(args) or 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="longreach", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["train", "eval", "demo", "bench"])
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="YAML config and/or key=value overrides")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    ns = parser.parse_args(argv[:1])
    rest = argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        if ns.command == "bench":
            return _cmd_bench(rest)
        return _cmd_run(ns.command, rest)
    except ConfigError as e:  # user input: one line naming the field and the fix, no traceback
        print(f"longreach: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
