"""Load on the web page (`liveportrait-triton ui`): concurrent gradio_client Animate sessions plus Live sessions up
to the page's limit and one past it, against a running server (a benchmark, not a test).

    python -m liveportrait_triton.benchmarks.ui_load --server HOST:GRPC_PORT [--animate-sessions 4] \\
        [--live-frames 20] [--out DIR]

The page runs in this process on loopback (`ui.launch`, as `liveportrait-triton ui` does). Animate sessions are
separate `gradio_client.Client`s calling `/animate` with the `examples` command's portrait (scikit-image's
astronaut) and a 5-frame driving clip of it. Live sessions are opened with `App.live_start`, the call behind the
page's Start button, and fed camera frames through their session's `animate`, the call the WebRTC track handler makes for the
newest frame; the page's limit (`Limits.live_sessions`) plus one are started. Every call has a deadline: a session
is answered, refused with the page's message, or reported as hung. Writes ui_load.md into `--out`.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import tempfile
import time
from pathlib import Path

import numpy as np

from ..examples import write_examples
from .report import machine_info

DEADLINE_S = 600.0
DRIVING_FRAMES = 5


def animate_session(url: str, portrait: Path, driving: Path) -> tuple[str, float, str]:
    import gradio_client
    began = time.monotonic()
    try:
        client = gradio_client.Client(url, verbose=False)
        video = client.predict(gradio_client.handle_file(str(portrait)), gradio_client.handle_file(str(driving)),
                               api_name="/animate")[0]
        from ..client import media
        frames = media.probe_video(video)["frames"]
        return "answered", time.monotonic() - began, f"{frames} frames"
    except Exception as exc:            # the page's error, reported
        return "refused or failed", time.monotonic() - began, str(exc).splitlines()[0][:200]


def live_session(app, number: int, portrait: str, frames: int) -> tuple[str, float, str]:
    from ..client import ui
    settings = {c.name: c.default for c in ui.LIVE_CONTROLS}
    began = time.monotonic()
    try:
        stream = app.live_start(f"load-session-{number}", portrait, settings)
    except ui.USER_ERRORS as exc:
        return "refused", time.monotonic() - began, str(exc).splitlines()[0][:200]
    camera = np.array(__import__("skimage.data", fromlist=["astronaut"]).astronaut())
    latencies = []
    try:
        for _ in range(frames):
            sent = time.monotonic()
            stream.session.animate(camera)
            latencies.append(time.monotonic() - sent)
    except ui.USER_ERRORS as exc:
        return "failed", time.monotonic() - began, str(exc).splitlines()[0][:200]
    finally:
        app.live.close(f"load-session-{number}")
    return ("answered", time.monotonic() - began,
            f"{len(latencies)} frames, p50 {np.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="gRPC address of a running server")
    parser.add_argument("--metrics-url", default=None)
    parser.add_argument("--animate-sessions", type=int, default=4)
    parser.add_argument("--live-frames", type=int, default=20)
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    from ..client import ui
    from ..serve import free_port
    app = ui.App(args.server, args.metrics_url)
    port = free_port()
    ui.launch(app, "127.0.0.1", port, block=False)
    url = f"http://127.0.0.1:{port}/"
    limit = app.limits.live_sessions
    with tempfile.TemporaryDirectory(prefix="ui-load-") as folder:
        examples = write_examples(Path(folder), frames=DRIVING_FRAMES)
        portrait, driving = examples["portrait"], examples["driving"]
        uploads = Path(app.upload_folder) / "ui_load"
        uploads.mkdir(parents=True, exist_ok=True)
        live_portrait = str(Path(__import__("shutil").copy(portrait, uploads)))
        with concurrent.futures.ThreadPoolExecutor(args.animate_sessions + limit + 1) as pool:
            animate = [pool.submit(animate_session, url, portrait, driving) for _ in range(args.animate_sessions)]
            live = []
            for k in range(limit + 1):      # the page's limit, then one more while they all stream
                live.append(pool.submit(live_session, app, k, live_portrait, args.live_frames))
                time.sleep(0.5)
            rows = []
            for kind, futures in (("Animate (gradio_client)", animate), ("Live", live)):
                for k, future in enumerate(futures):
                    try:
                        outcome, seconds, detail = future.result(timeout=DEADLINE_S)
                    except concurrent.futures.TimeoutError:
                        outcome, seconds, detail = "HUNG", DEADLINE_S, f"no answer within {DEADLINE_S:g} s"
                    rows.append((kind, k + 1, outcome, seconds, detail))
    lines = ["# Web page under load (`benchmarks/ui_load.py`)", "",
             f"{args.animate_sessions} gradio_client Animate sessions ({DRIVING_FRAMES}-frame clip) at once with "
             f"{limit + 1} Live sessions (the page's limit {limit}, plus one), {args.live_frames} frames each.", "",
             "| session | # | outcome | seconds | detail |", "|---|---|---|---|---|"]
    lines += [f"| {kind} | {k} | {outcome} | {seconds:.1f} | {detail} |" for kind, k, outcome, seconds, detail in rows]
    lines += ["", "Machine: " + "; ".join(f"{k} {v}" for k, v in machine_info().items()), ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ui_load.md").write_text("\n".join(lines))
    print("\n".join(lines), flush=True)
    app.close()
    return 1 if any(r[2] == "HUNG" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
