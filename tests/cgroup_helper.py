"""A minimal launcher for the cgroup tests: the cgroups layer's steps in launch order.

    python tests/cgroup_helper.py [--memory SIZE] [--cpus N] [--pids N] -- CMD ...

plan -> create -> fork the child (it waits) -> enter the child -> let it exec CMD ->
wait -> read back the limit files and usage -> remove. The last stdout line is one JSON
object (status, exit, mechanisms, leaf, base, launcher_leaf, files, usage, whether the
leaf and the launcher leaf still exist); the exit status is CMD's, 128+N for signal N,
as `nsbox run` reports it. It exists so that the cgroup v2 tests can run before the
lead wires the layer into launch.py; tests/test_cgroups.py calls it through one
function, `launch()`, which can switch to `nsbox run --json` unchanged in spirit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from nsbox import limits
from nsbox.errors import StepError
from nsbox.layers import cgroups

LIMIT_FILES = ("memory.max", "memory.swap.max", "memory.oom.group", "cpu.max", "pids.max",
               "memory.limit_in_bytes", "cpu.cfs_quota_us")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory", type=limits.parse_size)
    parser.add_argument("--cpus", type=limits.parse_cpus)
    parser.add_argument("--pids", type=limits.parse_pids)
    parser.add_argument("--best-effort", action="store_true")
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)

    try:
        plan = cgroups.plan(args.memory, args.cpus, args.pids, args.best_effort)
        cg = cgroups.create(plan)
    except StepError as e:
        print(e.render(), file=sys.stderr)
        return e.exit_code
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "holder": waits until it is in the leaf, then becomes CMD
        os.close(go_w)
        os.read(go_r, 1)
        cgroups.apply_rlimits(plan)
        try:
            os.execvp(args.command[0], args.command)
        finally:
            os._exit(127)
    os.close(go_r)
    if cg is not None:
        cgroups.enter(cg, pid)
    os.close(go_w)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    code = 128 - code if code < 0 else code

    result: dict[str, object] = {"exit": code, "mechanisms": {n: plan.mechanism(n) for n in ("memory", "cpus", "pids")},
                                 "describe": plan.describe()}
    if cg is not None:
        files = {}
        for leaf in cg.leaves:
            for name in LIMIT_FILES:
                path = os.path.join(leaf, name)
                if os.path.exists(path):
                    with open(path) as f:
                        files[name] = f.read().strip()
        result.update(leaf=cg.path, leaves=list(cg.leaves), base=cg.base, launcher_leaf=cg.launcher_leaf,
                      files=files, usage=cgroups.usage(cg))
        cgroups.remove(cg)
        result["leaves_after"] = [leaf for leaf in cg.leaves if os.path.exists(leaf)]
        result["launcher_leaf_after"] = bool(cg.launcher_leaf and os.path.exists(cg.launcher_leaf))
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
