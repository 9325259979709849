"""The short-lived child that compiles and loads the steering program with bcc.

Run as ``python -m wgmanager.datapath.compiler PIN_DIR MAX_CIDRS TOKEN``, never imported by
the agent: ``import bcc`` maps libLLVM and libclang (~60 MiB of resident memory that would
stay for the agent's whole life, for a compile that takes a third of a second at start).
The child compiles bpf/wg_redirect.c (its maps are pinned under PIN_DIR by the program
itself), loads its functions and pins each under ``PIN_DIR/load-TOKEN-<hook>``; the parent
(``wgmanager.datapath.bpf.Program``) opens those pins, removes them and attaches the
programs by fd. The child is spawned, not forked: the agent has threads.

Its one line of stdout is JSON: ``{"pins": {hook: path}}`` or ``{"error": message}`` (the
message already explained for an operator, see ``wgmanager.kernel_errors``).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from wgmanager.datapath import libbpf
from wgmanager.errors import DatapathError
from wgmanager.kernel_errors import explain_kernel_error

# The program's functions, as wgmanager.datapath.bpf.Hook.
HOOKS = ("from_pod", "to_underlay", "to_tunnel_l3")


def program_source() -> str:
    src = resources.files("wgmanager.datapath").joinpath("bpf_src/wg_redirect.c")
    return src.read_text()


def pin_path(pin_dir: Path, token: str, hook: str) -> Path:
    """Where the child pins one loaded function for the parent to pick up."""
    return pin_dir / f"load-{token}-{hook}"  # bpffs refuses names with a dot


def compile_and_pin(pin_dir: Path, max_cidrs: int, token: str) -> dict[str, str]:
    """Compiles, loads and pins both functions; returns hook -> pin path."""
    bpf = _compile(pin_dir, max_cidrs)
    pins: dict[str, str] = {}
    try:
        for hook in HOOKS:
            try:
                fn = bpf.load_func(hook.encode(), bpf.SCHED_CLS)
            except Exception as e:
                raise DatapathError(_explain_load_error(str(e))) from e
            path = pin_path(pin_dir, token, hook)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            libbpf.obj_pin(fn.fd, str(path))
            pins[hook] = str(path)
    except BaseException:
        for path_s in pins.values():
            with contextlib.suppress(OSError):
                os.unlink(path_s)
        raise
    finally:
        bpf.cleanup()
    return pins


def _compile(pin_dir: Path, max_cidrs: int) -> Any:
    try:
        from bcc import BPF
    except ImportError as e:
        raise DatapathError("the bcc Python module is missing; install Debian's python3-bpfcc "
                            "(the PyPI package named 'bcc' is unrelated)") from e
    headers = Path("/lib/modules") / platform.release() / "build"
    if not headers.exists():
        raise DatapathError(f"kernel headers for bcc are missing ({headers} does not exist); "
                            "install linux-headers and link them there (make setup does it)")
    cflags = [f'-DWGM_PIN_DIR="{pin_dir}"', f"-DWGM_MAX_CIDRS={max_cidrs}",
              "-Wno-unused-value", "-Wno-pointer-sign", "-Wno-compare-distinct-pointer-types"]
    with _quiet_stderr() as captured:
        try:
            # bcc wants bytes: a str works but warns with the whole C source on every load.
            return BPF(text=program_source().encode(), cflags=cflags)
        except Exception as e:
            raise DatapathError(_explain_compile_error(str(e), captured())) from e


def _explain_compile_error(message: str, stderr: str) -> str:
    # bcc's exception says only "Failed to compile"; the cause is in its (captured) stderr.
    return explain_kernel_error(f"{message}\n{stderr}", context="bpf-compile")


def _explain_load_error(message: str) -> str:
    return explain_kernel_error(message, context="bpf-load")


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[Callable[[], str]]:
    """bcc prints compiler output to fd 2; capture it so errors become one clear line."""
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        restored = False

        def read() -> str:
            nonlocal restored
            if not restored:
                os.dup2(saved, 2)
                restored = True
            tmp.seek(0)
            return tmp.read().decode(errors="replace")

        try:
            yield read
        finally:
            if not restored:
                os.dup2(saved, 2)
            os.close(saved)


def main(argv: list[str]) -> int:
    pin_dir, max_cidrs, token = Path(argv[0]), int(argv[1]), argv[2]
    try:
        reply: dict[str, Any] = {"pins": compile_and_pin(pin_dir, max_cidrs, token)}
    except DatapathError as e:
        reply = {"error": str(e)}
    except OSError as e:
        reply = {"error": explain_kernel_error(e, context="bpf-load")}
    print(json.dumps(reply), flush=True)
    return 0 if "pins" in reply else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
