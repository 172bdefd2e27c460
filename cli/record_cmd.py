"""`molmoact-edge record`: record a camera to a pyrealsense2 `.db3` file or an image folder.

    molmoact-edge record --camera realsense[:SERIAL] --out take1.db3 --seconds 10
    molmoact-edge record --camera realsense --out take1/            (PNG colour + 16-bit depth)
    molmoact-edge record --list                                      (attached RealSense cameras)

The result replays with `--camera replay:PATH`.
"""

from __future__ import annotations

import argparse
import sys

from molmoact_edge.argtypes import device_spec, positive_float
from molmoact_edge.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--camera", metavar="SPEC", type=device_spec({"realsense": "", "replay": "PATH"}),
                   help="realsense | realsense:SERIAL | replay:PATH (needed unless --list)")
    p.add_argument("--out", help="a .db3 path (pyrealsense2 recording) or a folder (needed unless --list)")
    p.add_argument("--seconds", type=positive_float, default=10.0)
    p.add_argument("--force", action="store_true", help="replace an existing recording at --out")
    p.add_argument("--list", action="store_true", help="list attached RealSense cameras and exit")


def run(args: argparse.Namespace) -> int:
    from molmoact_edge.hardware.devices import open_camera
    from molmoact_edge.hardware.recording import check_target, record

    if args.list:
        from molmoact_edge.hardware.realsense import list_devices

        devs = list_devices()
        for d in devs:
            print(f"{d.serial}  {d.name}  USB {d.usb or '?'}  firmware {d.firmware}")
        if not devs:
            print("no RealSense camera attached", file=sys.stderr)
        return 0
    missing = [flag for flag, v in (("--camera", args.camera), ("--out", args.out)) if not v]
    if missing:
        raise UsageError(f"record needs {' and '.join(missing)} (or --list to show the attached cameras)")
    if not args.force:
        check_target(args.out)  # before the camera starts: fail at once
    with open_camera(args.camera) as cam:
        cam.wait_first_frame(5.0)
        n = record(cam, args.out, args.seconds, force=args.force)
    print(f"recorded {n} frames to {args.out}", file=sys.stderr)
    return 0 if n else 1
