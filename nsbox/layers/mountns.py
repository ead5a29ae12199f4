"""Mount namespace: the filesystem the agent sees, built from nothing.

init gets its own copy of the host's mount table (unshare CLONE_NEWNS) and then:

1. `make_private`: makes every mount private, so no mount event travels back to the host;
2. `enter_scratch`: mounts a small tmpfs and pivots into it. The host's root is now at
   /oldroot, and every bind below takes its source from there. Building the new root
   from /oldroot, not from live host paths, means nothing we mount can hide a source we
   still need (the project may well live under the host's /tmp);
3. `build_root`: a fresh tmpfs at /newroot and, in depth order, the mounts of the plan:
   /usr /bin /sbin /lib* /etc /opt read-only (what exists; symlinks such as Debian's
   /bin -> usr/bin are recreated as symlinks), nothing of the caller's home, the
   project read-write at its own absolute path (nosuid, nodev), the files in the project
   that later run on the host re-bound read-only (`PROTECTED_PATHS`), a private
   persistent $HOME, /tmp as tmpfs, a minimal /dev;
4. (`pidns.mount_proc` mounts /proc here, while the host's /proc is still visible);
5. `seal`: the new root's own tmpfs and /dev become read-only;
6. `pivot_root`: / becomes the new root and the old one (with /oldroot) is detached.

Read-only binds use mount_setattr(2) with AT_RECURSIVE, which reaches every submount and
never trips over flags the kernel locked on mounts inherited from the host.

Kernel docs: mount_namespaces(7), pivot_root(2) (the "pivot_root('.', '.')" note),
             mount_setattr(2), Documentation/filesystems/sharedsubtree.rst.
Order:       after the user namespace (so the mounts belong to it); before caps are
             dropped (mounting needs CAP_SYS_ADMIN in that namespace).
Verify:      writing under /usr fails with EROFS; the project is writable; a file in the
             caller's home is absent; `.git/hooks/x` cannot be created; /dev lists only
             the nodes below; /proc/self/mountinfo shows no /oldroot.
"""

from __future__ import annotations

import errno as errno_mod
import os
import stat
from typing import NamedTuple

from nsbox import syscalls
from nsbox.errors import StepError, acting, usage_error
from nsbox.syscalls import MountAttr, MountFlag

SCRATCH = "/tmp"  # a directory every host has; the scratch tmpfs hides it only in our namespace
HOST = "/oldroot"  # where the host's root is while the new root is built
NEW = "/newroot"  # where the new root is built

SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt")
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
# Files in the project that the host runs later (git runs hooks and obeys core.* settings
# such as core.fsmonitor or core.hooksPath on the host); --writable-git opts out.
PROTECTED_PATHS = (".git/hooks", ".git/config")
AGENT_BIN = "/run/nsbox/bin"  # where host-resolved commands (the agent binary) are bound

_RO = MountAttr.MOUNT_ATTR_RDONLY | MountAttr.MOUNT_ATTR_NOSUID | MountAttr.MOUNT_ATTR_NODEV
_RW = MountAttr.MOUNT_ATTR_NOSUID | MountAttr.MOUNT_ATTR_NODEV
_DEVICE = MountAttr.MOUNT_ATTR_NOSUID | MountAttr.MOUNT_ATTR_NOEXEC


class Mount(NamedTuple):
    """One entry of the new root. `target` is an inside path."""

    kind: str  # bind | tmpfs | devpts | symlink | file | dir
    target: str
    source: str = ""  # bind: host path; symlink: link text; file: content
    readonly: bool = True
    options: str = ""  # tmpfs/devpts mount data
    why: str = ""

    def describe(self) -> str:
        if self.kind == "bind":
            flags = "ro,nosuid,nodev" if self.readonly else "rw,nosuid,nodev"
            return f"bind {self.source} -> {self.target} ({flags})"
        if self.kind in ("tmpfs", "devpts"):
            return f"{self.kind} {self.target} ({self.options or 'defaults'}{',ro' if self.readonly else ''})"
        if self.kind == "symlink":
            return f"symlink {self.target} -> {self.source}"
        if self.kind == "file":
            return f"file {self.target} (generated, ro)"
        return f"dir {self.target}"


class Root(NamedTuple):
    """What / is: a fresh tmpfs (host mode), or an overlay on an image's unpacked tree."""

    image: str | None = None  # host path of the unpacked image (the overlay's lower layer)
    upper: str | None = None  # host dir of the persistent upper layer (its workdir beside it)
    upper_size: int | None = None  # --disk in image mode: the upper is a tmpfs of this size

    def describe(self) -> str:
        if self.image is None:
            return "a fresh tmpfs, read-only once built"
        upper = (f"a tmpfs of {self.upper_size} bytes (--disk; discarded at exit)" if self.upper_size
                 else f"{self.upper} (persistent per sandbox name; --fresh discards it)")
        return f"overlay: image {self.image} (read-only lower), writes go to {upper}"


FRESH_ROOT = Root()  # host mode: / is a fresh tmpfs


class MountNsPlan(NamedTuple):
    mounts: tuple[Mount, ...]
    project: str
    root: Root = FRESH_ROOT
    project_writable: bool = True  # by the caller on the host: the mount cannot grant more

    def describe(self) -> list[str]:
        return [f"new mount namespace, private propagation; pivot_root into {self.root.describe()}"] + [
            "  " + m.describe() + (f"   # {m.why}" if m.why else "") for m in self.ordered()
        ]

    def ordered(self) -> list[Mount]:
        # Parents before children: /tmp before a project that lives under /tmp.
        return sorted(self.mounts, key=lambda m: m.target.rstrip("/").count("/"))


def _depth_ok(path: str) -> None:
    if not os.path.isabs(path) or "/../" in path + "/" or "//" in path:
        raise usage_error("mountns.plan", f"{path!r} is not a clean absolute path")


def plan(
    project: str,
    home_source: str,
    home_target: str,
    passwd: str,
    group: str,
    writable_git: bool = False,
    extra_ro_binds: tuple[tuple[str, str, str], ...] = (),  # (host path, inside path, why)
    disk: int | None = None,
    root: Root = FRESH_ROOT,
) -> MountNsPlan:
    """The mounts of a sandbox. Pure, except for lstat() of the host paths it names."""
    _depth_ok(project)
    for path in (root.image, root.upper):
        if path and any(c in path for c in ",:\\\n"):
            raise usage_error("mountns.plan", f"{path!r} contains a character overlayfs options cannot carry",
                              fix="set XDG_DATA_HOME to a path without ',', ':' or '\\'")
    mounts: list[Mount] = []
    for d in SYSTEM_DIRS if root.image is None else ():  # image mode: the image provides them
        if os.path.islink(d):
            mounts.append(Mount("symlink", d, os.readlink(d), why="as on the host (merged /usr)"))
        elif os.path.isdir(d):
            mounts.append(Mount("bind", d, d, why="host system files, read-only"))
    mounts += [
        Mount("file", "/etc/passwd", passwd, why="only root, the agent's user and nobody"),
        Mount("file", "/etc/group", group),
        Mount("bind", home_target, home_source, readonly=False, why="private $HOME, persistent per sandbox name"),
        Mount("bind", project, project, readonly=False, why="the project, at its own path"),
        Mount("tmpfs", "/tmp", readonly=False, options="mode=1777" + _size(disk),
              why="private /tmp" + (" (--disk)" if disk else "")),
        Mount("dir", "/proc", why="procfs is mounted here by pidns.mount_proc"),
        Mount("dir", "/run/nsbox"),
    ]
    if not writable_git:
        for rel in PROTECTED_PATHS:
            path = os.path.join(project, rel)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode):
                raise usage_error(
                    "mountns.plan", f"{path} is a symbolic link; nsbox protects it and will not follow it",
                    fix=f"inspect it (ls -l {path}); replace it with a real file or directory, "
                        "or run with --writable-git",
                )
            mounts.append(Mount("bind", path, path, why="runs on the host later: read-only (--writable-git)"))
    mounts += _dev_mounts(disk)
    for source, target, why in extra_ro_binds:
        _depth_ok(target)
        if not os.path.exists(source):
            raise usage_error("mountns.plan", f"{source!r} does not exist on the host",
                              fix="give an existing file or directory to --ro-bind")
        mounts.append(Mount("bind", target, source, why=why))
    return MountNsPlan(tuple(mounts), project, root, os.access(project, os.W_OK))


def _size(disk: int | None) -> str:
    # tmpfs size= caps the blocks a writer can use; past it, write(2) fails with ENOSPC.
    return f",size={disk}" if disk else ""


def _dev_mounts(disk: int | None) -> list[Mount]:
    m = [Mount("tmpfs", "/dev", options="mode=0755", why="minimal /dev; no host device but these")]
    m += [Mount("bind", f"/dev/{d}", f"/dev/{d}", readonly=False) for d in DEVICES]
    m += [
        Mount("devpts", "/dev/pts", readonly=False, options="newinstance,ptmxmode=0666,mode=0620",
              why="the sandbox's own ptys; none of the host's"),
        Mount("symlink", "/dev/ptmx", "pts/ptmx"),
        Mount("tmpfs", "/dev/shm", readonly=False, options="mode=1777" + _size(disk)),
        Mount("symlink", "/dev/fd", "/proc/self/fd"),
        Mount("symlink", "/dev/stdin", "/proc/self/fd/0"),
        Mount("symlink", "/dev/stdout", "/proc/self/fd/1"),
        Mount("symlink", "/dev/stderr", "/proc/self/fd/2"),
    ]
    return m


# ---- steps (role INIT) ------------------------------------------------------------------


def make_private(p: MountNsPlan) -> None:
    """Before any mount: no mount or unmount we do may propagate to the host."""
    with acting("mountns.make_private", "mount(None, '/', MS_REC|MS_PRIVATE)"):
        syscalls.mount(None, "/", None, MountFlag.MS_REC | MountFlag.MS_PRIVATE)


def enter_scratch(p: MountNsPlan) -> None:
    """Pivot into a scratch tmpfs; the host root stays reachable at /oldroot until detached."""
    step = "mountns.enter_scratch"
    with acting(step, f"mount('tmpfs', {SCRATCH!r}, 'tmpfs', MS_NOSUID|MS_NODEV)"):
        syscalls.mount("tmpfs", SCRATCH, "tmpfs", MountFlag.MS_NOSUID | MountFlag.MS_NODEV, "mode=0700,size=4m")
    with acting(step, f"pivot_root({SCRATCH!r}, {SCRATCH + HOST!r})"):
        os.chdir(SCRATCH)
        os.mkdir(HOST[1:])
        os.mkdir(NEW[1:])
        syscalls.pivot_root(".", HOST[1:])
        os.chdir("/")


def _host(path: str) -> str:
    return HOST + path


def _new(path: str) -> str:
    return NEW + path


def _safe_dirs(path: str) -> None:
    """mkdir -p of an inside path under the new root, refusing any symlink on the way.

    The tree under /newroot may come from an image, or from the agent's persistent home:
    a symlink there (`/dev -> /oldroot/home/you`) would send a mkdir or a mount to the
    host. Nothing is followed: every existing component must be a real directory.
    """
    assert path.startswith(NEW)
    current = NEW
    for part in path[len(NEW):].strip("/").split("/"):
        if not part:
            continue
        current = f"{current}/{part}"
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            os.mkdir(current, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise StepError("mountns.build_root", f"mount point {current[len(NEW):]!r}",
                            detail=f"it is {kind} in the new root; refusing to follow or replace it",
                            fix="remove it from the image, the sandbox's home, or the project")


def _make_mountpoint(target: str, is_dir: bool) -> None:
    if is_dir:
        _safe_dirs(target)
        return
    _safe_dirs(os.path.dirname(target))
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        return
    if not stat.S_ISREG(st.st_mode):
        raise StepError("mountns.build_root", f"mount point {target[len(NEW):]!r}",
                        detail="expected a regular file in the new root (a symlink or device is refused)")


def _bind(m: Mount, index: int) -> None:
    step = "mountns.build_root"
    source, target = _host(m.source), _new(m.target)
    with acting(step, f"lstat({m.source!r})"):
        st = os.lstat(source)
    if stat.S_ISLNK(st.st_mode):
        # Never follow a symlink as a bind source: it may point anywhere on the host.
        raise StepError(step, f"bind {m.source}", detail="the source is a symbolic link; refusing to follow it")
    if m.target.startswith("/dev/") and not stat.S_ISCHR(st.st_mode):
        raise StepError(step, f"bind {m.source}", detail="expected a character device on the host")
    with acting(step, f"mkdir/create mount point {m.target!r}"):
        _make_mountpoint(target, stat.S_ISDIR(st.st_mode))
    with acting(step, f"mount({m.source!r}, {m.target!r}, MS_BIND|MS_REC)"):
        syscalls.mount(source, target, None, MountFlag.MS_BIND | MountFlag.MS_REC)
    attrs = _RO if m.readonly else _RW
    if stat.S_ISCHR(st.st_mode):
        attrs = _DEVICE  # nodev on a device's own mount would make it unusable (EACCES)
    with acting(step, f"mount_setattr({m.target!r}, {attrs!s}, AT_RECURSIVE)"):
        syscalls.mount_setattr(target, attrs, recursive=True)


# Image entries the read-only fallback does not bind: nsbox provides these itself (fresh
# tmpfs, /proc, /dev) or needs to create mount points in them (/home, /run).
_FALLBACK_OWN = ("proc", "dev", "sys", "tmp", "home", "run")


def _bind_image_read_only(image: str) -> None:
    """Without overlayfs: a tmpfs root, each top-level entry of the image bound read-only.

    The image's tree stays untouched (nothing can write it), and nsbox can still create
    its mount points (/home/<user>, the project's path, /run/nsbox) on the tmpfs.
    Writes outside /tmp, $HOME and the project fail with EROFS.
    """
    step = "mountns.build_root"
    source = _host(image)
    with acting(step, f"mount('tmpfs', {NEW!r}) and bind {image} read-only, entry by entry"):
        syscalls.mount("tmpfs", NEW, "tmpfs", MountFlag.MS_NOSUID | MountFlag.MS_NODEV, "mode=0755")
        for entry in os.scandir(source):
            if entry.name in _FALLBACK_OWN:
                continue
            target = _new("/" + entry.name)
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), target)
                continue
            if entry.is_dir(follow_symlinks=False):
                os.mkdir(target, 0o755)
            elif entry.is_file(follow_symlinks=False):
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
            else:
                continue  # devices, fifos, sockets at the top of an image: not carried over
            syscalls.mount(entry.path, target, None, MountFlag.MS_BIND | MountFlag.MS_REC)
            syscalls.mount_setattr(target, _RO, recursive=True)


def _mount_root(root: Root) -> str | None:
    """Mount the new root; return why the image's root is read-only, if it had to be."""
    step = "mountns.build_root"
    flags = MountFlag.MS_NOSUID | MountFlag.MS_NODEV
    if root.image is None:
        with acting(step, f"mount('tmpfs', {NEW!r}, 'tmpfs', MS_NOSUID|MS_NODEV)"):
            syscalls.mount("tmpfs", NEW, "tmpfs", flags, "mode=0755")
        return None
    if root.upper_size:
        # --disk: the writable layer is a sized tmpfs on the scratch root, gone at exit.
        with acting(step, f"mount('tmpfs', '/upper', 'tmpfs', size={root.upper_size})"):
            os.mkdir("/upper")
            syscalls.mount("tmpfs", "/upper", "tmpfs", flags, f"mode=0755,size={root.upper_size}")
            os.mkdir("/upper/data")
            os.mkdir("/upper/work")
        upper, work = "/upper/data", "/upper/work"
    else:
        assert root.upper is not None
        upper, work = _host(root.upper + "/data"), _host(root.upper + "/work")
    # userxattr: in a user namespace overlayfs keeps its whiteouts in user.* xattrs
    # (trusted.* needs CAP_SYS_ADMIN in the initial namespace).
    options = f"lowerdir={_host(root.image)},upperdir={upper},workdir={work},userxattr"
    try:
        syscalls.mount("overlay", NEW, "overlay", flags, options)
        return None
    except OSError as e:
        # No overlayfs here (an old kernel, a user namespace that may not mount it, an
        # upper layer on a filesystem it refuses): the image read-only, and said so.
        _bind_image_read_only(root.image)
        return (f"overlayfs refused the image's root ({errno_mod.errorcode.get(e.errno or 0, e.errno)}: "
                f"{os.strerror(e.errno or 0)}); the image is bound read-only instead: writes outside /tmp, "
                "$HOME and the project fail, and nothing persists in the sandbox's upper layer")


def build_root(p: MountNsPlan) -> str | None:
    """The new root (tmpfs or overlay) with the plan's mounts, parents before children.

    Returns a warning when the image's root had to be bound read-only (no overlayfs).
    """
    step = "mountns.build_root"
    warning = _mount_root(p.root)
    for i, m in enumerate(p.ordered()):
        target = _new(m.target)
        if m.kind == "bind":
            _bind(m, i)
        elif m.kind in ("tmpfs", "devpts"):
            flags = MountFlag.MS_NOSUID | MountFlag.MS_NODEV
            if m.kind == "devpts":  # its ptmx and pts/N are devices: nodev would make them unusable
                flags = MountFlag.MS_NOSUID | MountFlag.MS_NOEXEC
            with acting(step, f"mount({m.kind!r}, {m.target!r}, {m.kind!r}, {flags!s}, {m.options!r})"):
                _safe_dirs(target)
                syscalls.mount(m.kind, target, m.kind, flags, m.options)
        elif m.kind == "symlink":
            with acting(step, f"symlink({m.source!r}, {m.target!r})"):
                _safe_dirs(os.path.dirname(target))
                if os.path.islink(target) and os.readlink(target) == m.source:
                    continue  # an image (or an earlier run's upper layer) has it already
                os.symlink(m.source, target)
        elif m.kind == "dir":
            with acting(step, f"mkdir({m.target!r})"):
                _safe_dirs(target)
        elif m.kind == "file":
            # The content lives on the scratch tmpfs; bound read-only onto its target.
            staged = f"/file{i}"
            with acting(step, f"bind generated file onto {m.target!r}"):
                with open(staged, "w") as f:
                    f.write(m.source)
                _make_mountpoint(target, is_dir=False)
                syscalls.mount(staged, target, None, MountFlag.MS_BIND)
                syscalls.mount_setattr(target, _RO, recursive=False)
    return warning


def seal(p: MountNsPlan, overlay_root: bool = True) -> None:
    """Make the root tmpfs and /dev read-only: the agent owns their inodes, so only the
    mount flag stops it from creating files at /, /run or /dev. (An image's overlay root
    stays writable: its writes land in the sandbox's own upper layer.)"""
    for inside in ("/dev",) if p.root.image and overlay_root else ("/dev", ""):
        with acting("mountns.seal", f"mount_setattr({inside or '/'!r}, MOUNT_ATTR_RDONLY)"):
            syscalls.mount_setattr(_new(inside) or NEW, _RO, recursive=False)


def pivot_root(p: MountNsPlan) -> None:
    """Make the new root '/', then detach the old root (the scratch tmpfs with the host).

    pivot_root(".", ".") stacks the old root on top of the new one at "/"; the
    umount2(MNT_DETACH) that follows takes it away, and the host's root with it. This
    is the idiom pivot_root(2) documents and runc and bubblewrap use.
    """
    step = "mountns.pivot_root"
    with acting(step, f"pivot_root('.', '.') in {NEW!r}"):
        os.chdir(NEW)
        syscalls.pivot_root(".", ".")
    with acting(step, "umount2('.', MNT_DETACH)"):
        syscalls.umount2(".", syscalls.MNT_DETACH)
        os.chdir("/")
