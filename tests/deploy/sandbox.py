"""Run a command under the confinement a systemd unit file asks for, without systemd.

There is no systemd as PID 1 here (nor in CI), so the units' hardening cannot be tried by
``systemctl start``. This applies the settings that could break a Python service, read
from the unit file itself, with the same kernel mechanisms systemd uses:

- ProtectSystem=strict, ReadWritePaths=, ProtectHome=yes, ProtectProc=, ProcSubset=
  (a private mount namespace: everything read-only except the given writable paths,
  home directories hidden, a /proc showing only our own processes);
- User= (as ``nobody``), NoNewPrivileges=, CapabilityBoundingSet= (setpriv);
- SystemCallFilter= with SystemCallErrorNumber=, RestrictAddressFamilies= and
  MemoryDenyWriteExecute= (seccomp filters, the group lists taken from
  ``systemd-analyze syscall-filter``), UMask=.

    unshare --mount --propagation private -- /usr/bin/python3 sandbox.py setup \\
        --unit FILE --rw DIR [--rw DIR...] -- COMMAND...

Every stage replaces itself with the next (exec), so the command keeps the pid the
caller started and receives its signals. Runs with the system Python (Debian's
python3-seccomp provides the seccomp module), as root for the setup stage.
"""

from __future__ import annotations

import argparse
import errno
import mmap
import os
import socket
import subprocess
import sys
from pathlib import Path

SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY = 65534
# What systemd allows whatever the filter says (see systemd.exec(5), SystemCallFilter=).
IMPLICITLY_ALLOWED = {"execve", "exit", "exit_group", "getrlimit", "rt_sigreturn", "sigreturn"}
API_MOUNTS = ("/proc", "/sys", "/dev")
HOME_DIRS = ("/root", "/home", "/run/user")


def read_unit(path: Path) -> dict[str, list[str]]:
    """The [Service] settings of a unit file: name -> values in order (repeats kept)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service" and "=" in line:
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def last(settings: dict[str, list[str]], key: str, default: str = "") -> str:
    values = settings.get(key)
    return values[-1] if values else default


def is_yes(value: str) -> bool:
    return value.lower() in ("yes", "true", "1", "on")


# --- stage 1: mounts (root, in a private mount namespace) ------------------------------


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def _mount_points() -> list[tuple[str, set[str]]]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        points.append((fields[4], set(fields[5].split(","))))
    return points


def _under(path: str, tops: tuple[str, ...]) -> bool:
    return any(path == top or path.startswith(top + "/") for top in tops)


def setup_mounts(settings: dict[str, list[str]], writable: list[str]) -> None:
    _mount("--make-rprivate", "/")
    if last(settings, "ProtectSystem") == "strict":
        for point, options in _mount_points():
            if "rw" in options and not _under(point, API_MOUNTS):
                _mount("-o", "remount,bind,ro", point)
        for path in writable:
            _mount("--bind", path, path)
            _mount("-o", "remount,bind,rw", path)
    if is_yes(last(settings, "ProtectHome")):
        for home in HOME_DIRS:
            if os.path.isdir(home):
                _mount("-t", "tmpfs", "-o", "ro,mode=0755,size=4k", "tmpfs", home)
    proc_options = []
    if last(settings, "ProtectProc") in ("invisible", "noaccess", "ptraceable"):
        proc_options.append(f"hidepid={last(settings, 'ProtectProc')}")
    if last(settings, "ProcSubset") == "pid":
        proc_options.append("subset=pid")
    if proc_options:
        _mount("-t", "proc", "-o", ",".join(proc_options), "proc", "/proc")


def check_mounts(settings: dict[str, list[str]], writable: list[str]) -> None:
    """Fail loudly if the mounts did not take: a no-op sandbox would prove nothing."""
    if last(settings, "ProtectSystem") == "strict":
        if not os.statvfs("/").f_flag & os.ST_RDONLY:
            raise SystemExit("sandbox: / is still writable")
        for path in writable:
            if os.statvfs(path).f_flag & os.ST_RDONLY:
                raise SystemExit(f"sandbox: {path} is not writable")
    if is_yes(last(settings, "ProtectHome")) and os.listdir("/root"):
        raise SystemExit("sandbox: /root is still visible")


def stage_setup(args: argparse.Namespace) -> None:
    unit = Path(args.unit)
    settings = read_unit(unit)
    setup_mounts(settings, args.rw)
    check_mounts(settings, args.rw)
    here = Path(__file__).resolve()
    priv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    if is_yes(last(settings, "NoNewPrivileges")):
        priv.append("--no-new-privs")
    if "CapabilityBoundingSet" in settings and last(settings, "CapabilityBoundingSet") == "":
        priv += ["--bounding-set=-all", "--inh-caps=-all"]
    cmd = [*priv, "--", SYSTEM_PYTHON, str(here), "filter", "--unit", str(unit), "--", *args.cmd]
    os.execvp(cmd[0], cmd)


# --- stage 2: seccomp (as the service user) --------------------------------------------


def syscall_groups() -> dict[str, list[str]]:
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter"], check=True, capture_output=True, text=True
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        item = line.strip()
        if not item:
            current = None
        elif not line.startswith(" ") and item.startswith("@"):
            current = groups.setdefault(item, [])
        elif current is not None and not item.startswith("#"):
            current.append(item)
    return groups


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    result: set[str] = set()
    todo = list(names)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name.startswith("@"):
            if name not in groups:
                raise SystemExit(f"sandbox: unknown syscall group {name}")
            todo.extend(groups[name])
        else:
            result.add(name)
    return result


def _errno(name: str) -> int:
    return int(getattr(errno, name)) if not name.isdigit() else int(name)


def _add(flt: object, action: object, name: str, *conds: object) -> None:
    try:
        flt.add_rule(action, name, *conds)  # type: ignore[attr-defined]
    except (RuntimeError, ValueError, OSError):
        pass  # a syscall this architecture does not have


def syscall_filters(settings: dict[str, list[str]]) -> list[object]:
    import seccomp  # type: ignore[import-not-found]  # Debian's python3-seccomp

    filters: list[object] = []
    values = settings.get("SystemCallFilter", [])
    if values:
        groups = syscall_groups()
        allowed: set[str] = set()
        denied: set[str] = set()
        for value in values:
            if value.startswith("~"):
                denied |= expand(value[1:].split(), groups)
            else:
                allowed |= expand(value.split(), groups)
        allowed = (allowed - denied) | IMPLICITLY_ALLOWED
        err = _errno(last(settings, "SystemCallErrorNumber", "EPERM"))
        flt = seccomp.SyscallFilter(defaction=seccomp.ERRNO(err))
        for name in sorted(allowed):
            _add(flt, seccomp.ALLOW, name)
        filters.append(flt)

    families = last(settings, "RestrictAddressFamilies").split()
    if families:
        # As systemd does it: refuse socket() for every family outside the allow list.
        numbers = sorted(int(getattr(socket, name)) for name in families)
        flt = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        refuse = seccomp.ERRNO(errno.EAFNOSUPPORT)
        _add(flt, refuse, "socket", seccomp.Arg(0, seccomp.LT, numbers[0]))
        _add(flt, refuse, "socket", seccomp.Arg(0, seccomp.GT, numbers[-1]))
        for family in range(numbers[0] + 1, numbers[-1]):
            if family not in numbers:
                _add(flt, refuse, "socket", seccomp.Arg(0, seccomp.EQ, family))
        filters.append(flt)

    if is_yes(last(settings, "MemoryDenyWriteExecute")):
        # As systemd does it: no mapping both writable and executable, no making memory
        # executable afterwards.
        flt = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        deny = seccomp.ERRNO(errno.EPERM)
        wx = mmap.PROT_WRITE | mmap.PROT_EXEC
        _add(flt, deny, "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, wx, wx))
        for name in ("mprotect", "pkey_mprotect"):
            x = mmap.PROT_EXEC
            _add(flt, deny, name, seccomp.Arg(2, seccomp.MASKED_EQ, x, x))
        shm_exec = 0o100000
        _add(flt, deny, "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, shm_exec, shm_exec))
        filters.append(flt)
    return filters


def stage_filter(args: argparse.Namespace) -> None:
    settings = read_unit(Path(args.unit))
    umask = last(settings, "UMask")
    if umask:
        os.umask(int(umask, 8))
    # The system call allow list goes last: it forbids seccomp() itself.
    for flt in reversed(syscall_filters(settings)):
        flt.load()  # type: ignore[attr-defined]
    os.execv(args.cmd[0], args.cmd)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("setup", "filter"))
    parser.add_argument("--unit", required=True)
    parser.add_argument("--rw", action="append", default=[])
    parser.add_argument("cmd", nargs="+")
    args = parser.parse_args(argv)
    if args.stage == "setup":
        stage_setup(args)
    else:
        stage_filter(args)


if __name__ == "__main__":
    main(sys.argv[1:])
