"""`liveportrait-triton` command line: one sub-command per job, each defined next to the code it drives.

Each entry names a module that provides ``add_arguments(parser)`` and ``run(args) -> int``; modules are imported
only when their command runs, so `--help` stays fast and a command's heavy imports stay its own.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "weights": ("liveportrait_triton.weights_cli", "write synthetic checkpoints in the official layout"),
    "export": ("liveportrait_triton.export.cli", "export sub-networks to ONNX and render the Triton repository"),
    "tensorrt": ("liveportrait_triton.export.tensorrt_cli", "build TensorRT engines from exported ONNX (GPU)"),
    "serve": ("liveportrait_triton.serve", "start the bundled Triton server on a model repository"),
    "cluster": ("liveportrait_triton.cluster", "start N bundled Triton replicas behind HAProxy (sessions pinned)"),
    "animate": ("liveportrait_triton.client.animate", "animate a portrait with a driving video/image/template"),
    "edit": ("liveportrait_triton.client.edit_cli", "edit a portrait's pose and expression (retargeting controls)"),
    "template": ("liveportrait_triton.client.template_cli", "extract a motion template (.npz) from a video"),
    "ui": ("liveportrait_triton.client.ui", "web interface (Gradio) on a running server: animate, edit, live webcam"),
    "bench": ("liveportrait_triton.benchmarks.cli", "run the benchmarks (in-process, server, perf_analyzer)"),
    "demo": ("liveportrait_triton.demo", "end-to-end demo: weights, export, serve, animate a built-in portrait"),
    "examples": ("liveportrait_triton.examples", "write example media: a portrait, a driving clip, a motion template"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="liveportrait-triton", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"liveportrait-triton {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    return int(module.run(args) or 0)
