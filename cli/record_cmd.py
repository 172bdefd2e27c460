"""`molmoact-edge record`: record a camera to a pyrealsense2 `.db3` file or an image folder.

    molmoact-edge record --camera realsense[:SERIAL] --out take1.db3 --seconds 10
    molmoact-edge record --camera realsense --out take1/            (PNG colour + 16-bit depth)

The result replays with `--camera replay:PATH`.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--camera", required=True, metavar="SPEC", help="realsense | realsense:SERIAL | replay:PATH")
    p.add_argument("--out", required=True, help="a .db3 path (pyrealsense2 recording) or a folder")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--list", action="store_true", help="list attached RealSense cameras and exit")


def run(args: argparse.Namespace) -> int:
    from molmoact_edge.hardware.camera import CameraError
    from molmoact_edge.hardware.deps import MissingDependencyError
    from molmoact_edge.hardware.devices import open_camera
    from molmoact_edge.hardware.recording import record

    try:
        if args.list:
            from molmoact_edge.hardware.realsense import list_devices

            devs = list_devices()
            for d in devs:
                print(f"{d.serial}  {d.name}  USB {d.usb or '?'}  firmware {d.firmware}")
            if not devs:
                print("no RealSense camera attached", file=sys.stderr)
            return 0
        with open_camera(args.camera) as cam:
            cam.wait_first_frame(5.0)
            n = record(cam, args.out, args.seconds)
    except (CameraError, MissingDependencyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"recorded {n} frames to {args.out}", file=sys.stderr)
    return 0 if n else 1
