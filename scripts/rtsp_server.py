#!/usr/bin/python3
"""A small RTSP server for tests and benchmarks: serves an H.264 MP4 clip in real time.

Run it with the SYSTEM python (GStreamer's Python bindings come from apt, not from the venv)::

    /usr/bin/python3 scripts/rtsp_server.py --port 8554 --file tests/data/car-detection.mp4 [--mount /cam]

The clip is sent without re-encoding (``filesrc ! qtdemux ! h264parse ! rtph264pay``), paced by
GStreamer at real time, so serving costs almost no CPU (docs/ingest.md, Test servers). Modes:

* ``--stall-after S``: stream normally for S seconds, then keep the session open and send no more
  video (a camera whose encoder froze).
* ``--silent``: no GStreamer at all; a TCP server that accepts connections and never answers
  (a camera whose RTSP service hangs).
* ``--protocols udp`` (or ``tcp``): offer only that lower transport; a SETUP asking for another
  gets 461 Unsupported Transport (a camera that refuses RTP over the RTSP connection).

Prints ``ready rtsp://127.0.0.1:PORT/MOUNT`` on stdout once listening; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
import time

# One connection's worth of buffer: the silent server reads requests only to discard them.
READ_BYTES = 4096
LISTEN_BACKLOG = 16


def serve_silent(port: int) -> None:
    """Accept TCP connections, read and ignore everything, never send a byte."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(LISTEN_BACKLOG)
    print(f"ready rtsp://127.0.0.1:{port}/ (silent)", flush=True)

    def swallow(conn: socket.socket) -> None:
        with conn:
            while conn.recv(READ_BYTES):
                pass

    while True:
        conn, _ = server.accept()
        threading.Thread(target=swallow, args=(conn,), daemon=True).start()


def serve_gst(port: int, path: str, mount: str, stall_after_s: float | None, protocols: str | None) -> None:
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtsp", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtsp, GstRtspServer

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(port))
    factory = GstRtspServer.RTSPMediaFactory()
    # config-interval=-1 repeats SPS/PPS before every keyframe so a client can start at any keyframe.
    factory.set_launch(
        f'( filesrc location="{path}" ! qtdemux ! h264parse config-interval=-1 ! rtph264pay name=pay0 pt=96 )'
    )
    factory.set_shared(False)
    if protocols is not None:
        lower = {"udp": GstRtsp.RTSPLowerTrans.UDP, "tcp": GstRtsp.RTSPLowerTrans.TCP}[protocols]
        factory.set_protocols(lower)

    if stall_after_s is not None:

        def on_configure(_factory: object, media: GstRtspServer.RTSPMedia) -> None:
            started = time.monotonic()
            pad = media.get_element().get_by_name("pay0").get_static_pad("src")

            def hold_late(_pad: object, _info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
                # A blocking probe parks the streaming thread: no data, but no EOS or BYE either
                # (dropping buffers instead made FFmpeg see the stream end).
                if time.monotonic() - started > stall_after_s:
                    return Gst.PadProbeReturn.OK
                return Gst.PadProbeReturn.PASS

            pad.add_probe(Gst.PadProbeType.BLOCK | Gst.PadProbeType.BUFFER | Gst.PadProbeType.BUFFER_LIST, hold_late)

        factory.connect("media-configure", on_configure)

    server.get_mount_points().add_factory(mount, factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{port}")
    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    print(f"ready rtsp://127.0.0.1:{port}{mount}", flush=True)
    loop.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--file", help="H.264 MP4 to serve")
    parser.add_argument("--mount", default="/cam", help="path of the stream (default: %(default)s)")
    parser.add_argument("--stall-after", type=float, help="stop sending video after this many seconds")
    parser.add_argument("--silent", action="store_true", help="accept TCP connections and never answer")
    parser.add_argument("--protocols", choices=("udp", "tcp"), help="offer only this RTP transport")
    args = parser.parse_args()
    if args.silent:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        serve_silent(args.port)
        return
    if not args.file:
        parser.error("--file is required unless --silent")
    serve_gst(args.port, args.file, args.mount, args.stall_after, args.protocols)


if __name__ == "__main__":
    main()
