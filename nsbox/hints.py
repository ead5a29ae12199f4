"""Why a step failed and how to fix it, as data: (step, errno) -> why/fix.

The launcher adds these to a StepError before printing it. Children never do: they only
know the step and the errno. Tests provoke the real errno, so a hint cannot outlive its
truth. What the host allows comes from `host.py` (the same reads as `nsbox doctor`), so
a failed run and the doctor give the same reason and the same fix.
"""

from __future__ import annotations

import errno
from typing import NamedTuple

from nsbox.errors import StepError


class Hint(NamedTuple):
    step: str  # a step id, or a prefix ending in "." for a whole layer
    errno: int | None
    why: str
    fix: str


HINTS: tuple[Hint, ...] = (
    Hint("userns.unshare", errno.ENOSPC,
         "the limit of user namespaces is reached: /proc/sys/user/max_user_namespaces is {max_userns} "
         "here (0 inside another sandbox that disabled nesting)",
         "run nsbox outside the enclosing sandbox, or ask an administrator: sysctl -w user.max_user_namespaces=15000"),
    Hint("userns.unshare", errno.EPERM,
         "this kernel does not let unprivileged users create user namespaces "
         "(kernel.unprivileged_userns_clone={userns_clone}, AppArmor restriction={apparmor_restrict}): "
         "{userns_why}",
         "{userns_fix}"),
    Hint("userns.write_maps", errno.EPERM,
         "the kernel refused the id map; an unprivileged user may map only its own uid and gid",
         "run nsbox as the user who should own the sandbox's files"),
    Hint("pidns.mount_proc", errno.EPERM,
         "the kernel grants a new procfs only while a fully visible /proc is mounted in the namespace; "
         "inside a container /proc usually has masked paths",
         "run nsbox on the host, or give the outer container an unmasked /proc"),
    Hint("mountns.", errno.EACCES,
         "a path nsbox binds is not accessible to you on the host",
         "check the permissions of the project and of its parent directories"),
    Hint("execve.execve", errno.ENOENT,
         "the command is looked up inside the sandbox (PATH=/run/nsbox/bin:/usr/local/bin:/usr/bin:/bin...), "
         "not on the host; only the host's system directories and the project are visible",
         "give a path that exists inside (e.g. a file in the project), or a command installed under /usr"),
    Hint("execve.execve", errno.EACCES,
         "the file exists but cannot be executed (no x bit, or a noexec mount)",
         "chmod +x it, or run it through its interpreter: nsbox run PROJECT -- sh ./script"),
    Hint("execve.execve", errno.ENOEXEC,
         "the file is not a binary this kernel can run and has no #! line",
         "run it through its interpreter: nsbox run PROJECT -- sh ./script"),
)


def host_values(err: int | None = None) -> dict[str, str]:
    """The host facts a hint may name, as text: host.py's reads (cheap; no probe is forked)."""
    from nsbox import host  # only when a launch failed: host.py loads every layer's module

    sysctls = host.userns_sysctls()
    why, fix = host.userns_why_fix(err, sysctls, host.in_outer_userns())
    return {
        "max_userns": sysctls["max_user_namespaces"] or "unknown",
        "userns_clone": sysctls["unprivileged_userns_clone"] or "absent",
        "apparmor_restrict": sysctls["apparmor_restrict_unprivileged_userns"] or "absent",
        "userns_why": why,
        "userns_fix": fix,
    }


def explain(err: StepError) -> StepError:
    """Fill err.why/err.fix from the table (first match), unless the step set them."""
    if err.why and err.fix:
        return err
    for hint in HINTS:
        matches_step = err.step == hint.step or (hint.step.endswith(".") and err.step.startswith(hint.step))
        if matches_step and hint.errno == err.errno:
            values = host_values(err.errno)
            err.why = err.why or hint.why.format(**values)
            err.fix = err.fix or hint.fix.format(**values)
            break
    return err
