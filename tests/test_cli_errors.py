"""Every expected failure of the command line is one `error:` line and the documented exit status
(README 'Exit status': 1 at run time, 2 for a usage error, 130 for Ctrl-C), never a traceback.

The commands are run as a user runs them (a subprocess of `python -m molmoact_edge`); the robot-only
install is imitated by making `import torch` fail inside that subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_torch

RUN_TIME, USAGE, INTERRUPTED = 1, 2, 130

# `python -c PRELUDE args...` runs the CLI; NO_TORCH makes torch unimportable as in `molmoact-edge[robot]`.
PRELUDE = "import sys; from molmoact_edge.main import main; raise SystemExit(main(sys.argv[1:]))"
NO_TORCH = "import sys; sys.modules['torch'] = None; " + PRELUDE


def cli(*args: str, prelude: str = PRELUDE, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", prelude, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def one_error_line(proc: subprocess.CompletedProcess, status: int) -> str:
    """The single `error:` line of a failed command, after checking status and the absence of a traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    return errors[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny random checkpoint in the official layout, its bundle and a scene image."""
    from molmoact_edge.export.onnx_export import export_bundle
    from molmoact_edge.export.tiny import synthetic_scene, write_checkpoint
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny")
    ckpt = write_checkpoint(root / "checkpoint", "tiny", 0) or root / "checkpoint"
    bundle = export_bundle(ckpt, root / "bundle", progress=lambda s: None)
    image = root / "scene.png"
    Image.fromarray(synthetic_scene(256, 256)).save(image)
    return {"checkpoint": Path(ckpt), "bundle": Path(bundle), "image": image}


# ---- the commands of issue 11, item 4 ----

def test_missing_replay_camera_is_one_line():
    line = one_error_line(cli("run", "--camera", "replay:nonexist", "--robot", "sim", "--instruction", "go"), RUN_TIME)
    assert "nonexist" in line and "does not exist" in line


@needs_torch
def test_bundle_with_edited_kv_cache_dtype_is_one_line(tiny, tmp_path):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny["bundle"], bundle)
    mpath = bundle / "manifest.json"
    manifest = json.loads(mpath.read_text())
    assert manifest["kv_cache"]["dtype"] == "float32"
    manifest["kv_cache"]["dtype"] = "float16"
    mpath.write_text(json.dumps(manifest))
    proc = cli("generate", "--bundle", bundle, "--image", tiny["image"], "--instruction", "close the box",
               "--max-new-tokens", "8")
    one_error_line(proc, RUN_TIME)


@pytest.mark.parametrize("command", [["demo"], ["bench", "--workdir", "bench-never-written"]])
def test_torch_commands_in_the_robot_install_name_the_extra(command, tmp_path):
    proc = cli(*command, prelude=NO_TORCH, env={"TMPDIR": str(tmp_path)})
    line = one_error_line(proc, RUN_TIME)
    assert "torch" in line and "molmoact-edge[export]" in line
    assert list(tmp_path.iterdir()) == []  # the demo's temporary folder is removed on failure too


@needs_torch
def test_bench_with_zero_new_tokens_is_a_usage_error():
    line = one_error_line(cli("bench", "--new-tokens", "0"), USAGE)
    assert "--new-tokens" in line


# A Ctrl-C at the start of a module import, inside the CLI: `python -c CTRL_C_AT_IMPORT module args...` sends
# SIGINT to itself (through Python's own handler, as a terminal's Ctrl-C) when `module` is first imported.
CTRL_C_AT_IMPORT = """import os, signal, sys
target = sys.argv.pop(1)
def hook(event, args):
    if event == "import" and args[0] == target and target not in sys.modules and not hook.sent:
        hook.sent = True
        sys.stderr.write("ctrl-c sent\\n")
        os.kill(os.getpid(), signal.SIGINT)
hook.sent = False
sys.addaudithook(hook)
""" + PRELUDE


def as_a_terminal_job() -> None:
    # A process started with SIGINT ignored (a background job of a non-interactive shell, as CI may run
    # pytest) passes that on and Python keeps ignoring Ctrl-C: the export then runs to the end whatever
    # the code does. A terminal's foreground job has the default disposition; give the child that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@needs_torch
@pytest.mark.parametrize("when", [
    ("[2/", 0.5), ("[2/", 2.0), ("[3/", 0.5),  # during the ONNX export of each graph (seconds after its line)
    # In the exporter's lazy import of torch._dynamo (which imports torch._inductor half-way): the
    # exporter turned that Ctrl-C into an AttributeError, tried its fallback strategy and ended in a
    # TorchExportError with a traceback (torch 2.13).
    ("import", "torch._inductor"),
], ids=["vision-0.5s", "vision-2s", "llm-0.5s", "in-torch._dynamo-import"])
def test_ctrl_c_during_export_is_one_line_and_leaves_no_bundle(tiny, tmp_path, when):
    import time

    out = tmp_path / "bundle"
    args = ["export", "--checkpoint", str(tiny["checkpoint"]), "--out", str(out)]
    at, arg = when
    program = [sys.executable, "-c", CTRL_C_AT_IMPORT, arg] if at == "import" else [sys.executable, "-c", PRELUDE]
    proc = subprocess.Popen(program + args, stderr=subprocess.PIPE, text=True, preexec_fn=as_a_terminal_job)
    lines = []
    for line in proc.stderr:  # progress lines come on stderr
        lines.append(line)
        if at != "import" and line.startswith(at):
            time.sleep(arg)
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, "", "".join(lines) + rest)
    if at == "import":
        assert "ctrl-c sent" in done.stderr, f"the export never imported {arg} (a torch upgrade moved it): {done.stderr}"
    line = one_error_line(done, INTERRUPTED)
    assert "interrupted" in line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]


# ---- one exit status per kind of failure ----

@pytest.mark.parametrize("flags", [["--max-new-tokens", "0"], ["--dtype", "bogus"], ["--device", "gpu0"],
                                   ["--steer-trace", "[[1, 2"], ["--max-actions", "-1"]])
def test_bad_generate_values_are_usage_errors(flags, tmp_path):
    proc = cli("generate", "--checkpoint", tmp_path, "--image", tmp_path / "a.png", "--instruction", "go", *flags)
    assert flags[0] in one_error_line(proc, USAGE)


def test_missing_checkpoint_folder_is_described_once_for_generate_and_export(tmp_path):
    missing = tmp_path / "MolmoAct-7B-D-0812"
    gen = one_error_line(cli("generate", "--checkpoint", missing, "--image", tmp_path / "a.png",
                             "--instruction", "go"), RUN_TIME)
    exp = one_error_line(cli("export", "--checkpoint", missing, "--out", tmp_path / "b"), RUN_TIME)
    assert gen == exp and str(missing) in gen


def test_empty_instruction_is_refused_before_anything_loads(tmp_path):
    # the checkpoint folder does not exist either: the instruction is what gets refused first
    line = one_error_line(cli("generate", "--checkpoint", tmp_path / "none", "--image", tmp_path / "a.png",
                              "--instruction", "  "), USAGE)
    assert "--instruction" in line


def test_bundle_with_torch_backend_is_a_usage_error_without_tensorrt(tmp_path):
    line = one_error_line(cli("generate", "--bundle", tmp_path, "--backend", "torch", "--image",
                              tmp_path / "a.png", "--instruction", "go"), USAGE)
    # names the engines a bundle really runs on (TensorRT too, since `build` and --backend tensorrt exist)
    assert "--checkpoint" in line and "onnxruntime or tensorrt" in line


@needs_torch
def test_cuda_device_without_cuda_says_so_not_that_the_checkpoint_is_corrupt(tiny):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this torch sees a CUDA GPU: the refusal of --device cuda cannot be shown here")
    line = one_error_line(cli("generate", "--checkpoint", tiny["checkpoint"], "--image", tiny["image"],
                              "--instruction", "go", "--device", "cuda"), RUN_TIME)
    assert "CUDA" in line and "corrupt" not in line and "--device cpu" in line


@needs_torch
def test_unknown_unnorm_key_is_a_usage_error_for_generate_and_run(tiny):
    gen = one_error_line(cli("generate", "--bundle", tiny["bundle"], "--image", tiny["image"], "--instruction", "go",
                             "--unnorm-key", "no_such_key"), USAGE)
    run = one_error_line(cli("run", "--camera", "replay:nonexist", "--robot", "sim", "--instruction", "go",
                             "--policy", "molmoact", "--bundle", tiny["bundle"], "--unnorm-key", "no_such_key"), USAGE)
    assert "no_such_key" in gen and "no_such_key" in run


def test_steering_without_grammar_is_a_usage_error(tmp_path):
    line = one_error_line(cli("generate", "--checkpoint", tmp_path, "--image", tmp_path / "a.png", "--instruction",
                              "go", "--no-grammar", "--steer-trace", "[[1, 2]]"), USAGE)
    assert "--no-grammar" in line


@needs_torch
def test_missing_image_is_a_run_time_failure(tiny, tmp_path):
    line = one_error_line(cli("generate", "--bundle", tiny["bundle"], "--image", tmp_path / "none.png",
                              "--instruction", "go"), RUN_TIME)
    assert "none.png" in line


def test_unknown_flag_is_one_line_usage_error():
    line = one_error_line(cli("run", "--camera", "replay:x", "--robot", "sim", "--instruction", "go", "--bogus"), USAGE)
    assert "--bogus" in line


def test_bad_robot_spec_is_a_usage_error():
    line = one_error_line(cli("run", "--camera", "replay:x", "--robot", "franka", "--instruction", "go"), USAGE)
    assert "franka:IP" in line


def test_version_and_defaults_in_help():
    from importlib.metadata import version

    proc = cli("--version")
    assert proc.returncode == 0 and version("molmoact-edge") in proc.stdout
    proc = cli("run", "--help")
    assert proc.returncode == 0 and "(default: 50.0)" in proc.stdout


# ---- recording ----

def test_record_list_alone_needs_no_camera_or_out():
    proc = cli("record", "--list")
    assert "Traceback" not in proc.stderr and "--camera" not in proc.stderr and "--out" not in proc.stderr


def test_record_without_out_is_a_usage_error():
    assert "--out" in one_error_line(cli("record", "--camera", "replay:x"), USAGE)


def test_recording_into_an_existing_take_is_refused_unless_forced(tmp_path):
    from control_helpers import write_folder

    src, out = tmp_path / "src", tmp_path / "take"
    write_folder(src, 20)
    args = ["record", "--camera", f"replay:{src}", "--out", out, "--seconds", "0.5"]
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    n_first = len(list((out / "color").iterdir()))
    assert "--force" in one_error_line(cli(*args), RUN_TIME)
    assert len(list((out / "color").iterdir())) == n_first  # the refused run wrote nothing
    forced = cli(*args[:-2], "--seconds", "0.2", "--force")
    assert forced.returncode == 0, forced.stderr
    images = len(list((out / "color").iterdir()))
    stamps = len((out / "timestamps.txt").read_text().splitlines())
    assert images == stamps  # one take, not two mixed


def test_check_target_removes_only_the_take(tmp_path):
    from molmoact_edge.hardware.recording import RecordingExistsError, check_target

    (tmp_path / "color").mkdir()
    (tmp_path / "color" / "000000.png").write_bytes(b"")
    (tmp_path / "timestamps.txt").write_text("0\n")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RecordingExistsError, match="--force"):
        check_target(tmp_path)
    check_target(tmp_path, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    check_target(tmp_path)  # nothing left to refuse
    db3 = tmp_path / "take.db3"
    db3.write_bytes(b"x")
    with pytest.raises(RecordingExistsError):
        check_target(db3)


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only expected failures become one line; an error of this program itself is not hidden."""
    import molmoact_edge.record_cmd as record_cmd
    from molmoact_edge.main import main

    def broken(args):
        return 1 / 0

    monkeypatch.setattr(record_cmd, "run", broken)
    with pytest.raises(ZeroDivisionError):
        main(["record", "--list"])
