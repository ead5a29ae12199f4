"""nsbox: a rootless sandbox for AI coding agents, built from Linux primitives.

Read in this order: `launch.py` (the whole launch sequence), then the layers it names
(`layers/userns.py`, `layers/mountns.py`, `layers/pidns.py`, ...), then `process.py`.

Embedders use the API below; the CLI (`cli.py`) is a thin layer over it:

    from nsbox import Sandbox, SandboxSpec
    result = Sandbox(SandboxSpec(project="/src/app")).run(["make", "test"])
    print(result.status, result.signal)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from nsbox.sandbox import Result, Sandbox
    from nsbox.spec import SandboxSpec


def __getattr__(name: str) -> Any:
    # Imported on first use, so tools that need only a part (the image layout writer,
    # the profile parser) do not load the launcher and its native dependencies.
    if name in ("Result", "Sandbox"):
        from nsbox import sandbox

        return getattr(sandbox, name)
    if name == "SandboxSpec":
        from nsbox.spec import SandboxSpec

        return SandboxSpec
    raise AttributeError(f"module 'nsbox' has no attribute {name!r}")


__all__ = ["Result", "Sandbox", "SandboxSpec", "__version__"]
