"""nsbox: a rootless sandbox for AI coding agents, built from Linux primitives.

Read in this order: `launch.py` (the whole launch sequence), then the layers it names
(`layers/userns.py`, `layers/mountns.py`, `layers/pidns.py`, ...), then `process.py`.

Embedders use the API below; the CLI (`cli.py`) is a thin layer over it:

    from nsbox import Sandbox, SandboxSpec
    result = Sandbox(SandboxSpec(project="/src/app")).run(["make", "test"])
    print(result.status, result.signal)
"""

__version__ = "0.1.0"

from nsbox.sandbox import Result, Sandbox
from nsbox.spec import SandboxSpec

__all__ = ["Result", "Sandbox", "SandboxSpec", "__version__"]
