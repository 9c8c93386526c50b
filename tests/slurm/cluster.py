"""A real, throw-away Slurm cluster on this host, for the launcher tests.

    with SlurmCluster() as c:          # or the ``slurm_cluster`` pytest fixture
        subprocess.run(["sbatch", ...], env=c.env())

Two nodes (``node1``, ``node2``) run as two ``slurmd -N nodeX`` processes on 127.0.0.1,
each with its own port and spool directory, next to one ``slurmctld`` and a private
``munged``. Everything (configuration, key, sockets, state, logs) lives in a fresh
temporary directory; clients find it through ``SLURM_CONF`` (``env()``). The node names are
appended to /etc/hosts while the cluster runs (torchrun's rendezvous resolves ``node1``).

Setup: installs Debian's ``slurmctld slurmd slurm-client munge`` with apt
(``--no-install-recommends``) when missing; pytest skips only when that is impossible
(apt unreachable, or not root). Any daemon that does not come up raises with the tail of
the daemon logs. Teardown (``__exit__``, and an atexit hook should that be skipped):
cancels jobs, SIGTERM then SIGKILL to every daemon's process group and to any leftover
process whose environment carries this cluster's ``SLURM_CONF`` (slurmstepd, job
processes), restores /etc/hosts byte-for-byte, removes the temporary directory.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel", "munged", "munge")
NODES = ("node1", "node2")
HOSTS = Path("/etc/hosts")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed here (no apt access, not root): tests skip with this reason."""


class SlurmClusterError(RuntimeError):
    """A daemon did not come up or the cluster misbehaved (message carries log tails)."""


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def ensure_installed(timeout: float = 600) -> None:
    """apt-get install the Slurm and munge packages if any binary is missing."""
    if not _missing_binaries():
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"slurm is not installed ({', '.join(_missing_binaries())} missing) and installing it needs root")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("slurm is not installed and apt-get is not available")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    p = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        u = subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=timeout)
        p = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            out = (u.stdout + u.stderr + p.stdout + p.stderr)[-2000:]
            raise SlurmUnavailable(f"apt-get could not install {' '.join(PACKAGES)} (apt unreachable?):\n{out}")
    if _missing_binaries():
        raise SlurmClusterError(f"installed {' '.join(PACKAGES)} but still missing: {_missing_binaries()}")


def _tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"({e})"
    return "\n".join(lines[-n:])


class SlurmCluster:
    """Context manager: a two-node Slurm cluster on 127.0.0.1 (see the module docstring)."""

    def __init__(self, cpus_per_node: int = 1, real_memory_mb: int = 2000, start_timeout: float = 90):
        self.cpus_per_node = cpus_per_node
        self.real_memory_mb = real_memory_mb
        self.start_timeout = start_timeout
        self.dir: Path | None = None
        self.conf: Path | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self._hosts_backup: bytes | None = None
        self._closed = False

    # -- public -----------------------------------------------------------------------
    def env(self, **extra) -> dict:
        """Environment for Slurm clients (sbatch, squeue, ...) talking to this cluster."""
        e = dict(os.environ)
        e["SLURM_CONF"] = str(self.conf)
        for k in list(e):  # a test run inside a Slurm job must not leak that job's settings
            if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF":
                del e[k]
        for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            e.pop(k, None)  # left by in-process model builds of other tests
        e.update({k: str(v) for k, v in extra.items()})
        return e

    def run(self, *cmd, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        p = subprocess.run(list(cmd), env=kw.pop("env", self.env()), capture_output=True, text=True, timeout=timeout, **kw)
        if check and p.returncode != 0:
            raise SlurmClusterError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}{p.stderr}\n{self.logs()}")
        return p

    def logs(self, n: int = 30) -> str:
        if self.dir is None:
            return ""
        parts = []
        for f in sorted((self.dir / "log").glob("*")):
            parts.append(f"--- {f.name} (last {n} lines)\n{_tail(f, n)}")
        return "\n".join(parts)

    def job_state(self, job_id: str) -> str | None:
        """Current state of a job (PENDING, RUNNING, ...), None once it left the controller."""
        p = self.run("squeue", "-h", "-j", str(job_id), "-o", "%T", check=False)
        out = p.stdout.strip()
        return out or None

    def wait_gone(self, job_id: str, timeout: float) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if self.job_state(job_id) is None:
                return
            time.sleep(1)
        raise SlurmClusterError(f"job {job_id} still in the queue after {timeout:.0f}s\n{self.logs()}")

    # -- lifecycle --------------------------------------------------------------------
    def __enter__(self) -> "SlurmCluster":
        ensure_installed()
        if os.geteuid() != 0:
            raise SlurmUnavailable("the test cluster runs its daemons as root and edits /etc/hosts: run as root")
        atexit.register(self.close)
        self._catch_sigterm()
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _catch_sigterm(self) -> None:
        """Turn SIGTERM (e.g. from `timeout`) into SystemExit so that teardown still runs."""
        import threading

        self._old_sigterm = None
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            def _term(signum, frame):
                raise SystemExit(128 + signum)

            self._old_sigterm = signal.signal(signal.SIGTERM, _term)

    def _start(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="dlm-slurm-"))
        d = self.dir
        for sub in ("munge", "state", "log", "spool", "run"):
            (d / sub).mkdir()
        os.chmod(d, 0o755)
        os.chmod(d / "munge", 0o755)  # munged refuses group/world-writable socket directories
        self._map_hosts()

        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        sock = d / "munge" / "munge.socket"
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        short = socket.gethostname().split(".")[0]
        self.conf = d / "slurm.conf"
        nodes = "\n".join(
            f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus_per_node} "
            f"RealMemory={self.real_memory_mb} State=UNKNOWN" for n, p in zip(NODES, node_ports)
        )
        self.conf.write_text(f"""# written by tests/slurm/cluster.py
ClusterName=dlmtest
SlurmctldHost={short}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock},cred_expire=10
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
EnforcePartLimits=ALL
MinJobAge=5
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")
        self._spawn("munged", ["munged", "-F", f"--socket={sock}", f"--key-file={key}",
                               f"--pid-file={d}/run/munged.pid", f"--log-file={d}/log/munged.log",
                               f"--seed-file={d}/munge/munged.seed"])
        self._wait(lambda: sock.exists() and subprocess.run(
            f"munge -n -S {sock} | unmunge -S {sock}", shell=True, capture_output=True).returncode == 0, "munged")
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, "slurmctld")
        for n in NODES:
            (d / "spool" / n).mkdir()
            self._spawn(f"slurmd-{n}", ["slurmd", "-D", "-N", n, "-f", str(self.conf)])

        def nodes_idle() -> bool:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            return all(states.get(n) == "idle" for n in NODES)

        self._wait(nodes_idle, "slurmd (nodes idle in sinfo)")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.dir / "log" / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env(), start_new_session=True)
        out.close()

    def _wait(self, ready, what: str) -> None:
        end = time.time() + self.start_timeout
        while time.time() < end:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise SlurmClusterError(f"{name} exited with code {p.returncode} while waiting for {what}\n{self.logs()}")
            try:
                if ready():
                    return
            except (OSError, subprocess.SubprocessError):
                pass
            time.sleep(0.5)
        extra = self.run("sinfo", "-N", "-l", check=False).stdout if "sinfo" in what else ""
        raise SlurmClusterError(f"{what} did not come up within {self.start_timeout:.0f}s\n{extra}\n{self.logs()}")

    def _map_hosts(self) -> None:
        self._hosts_backup = HOSTS.read_bytes()
        sep = b"" if self._hosts_backup.endswith(b"\n") or not self._hosts_backup else b"\n"
        line = ("127.0.0.1 " + " ".join(NODES) + "  # dlm_megatron tests/slurm (temporary)\n").encode()
        with open(HOSTS, "wb") as f:  # in place: /etc/hosts is often a bind mount
            f.write(self._hosts_backup + sep + line)
        for n in NODES:
            addr = socket.gethostbyname(n)
            if addr != "127.0.0.1":
                raise SlurmClusterError(f"{n} resolves to {addr}, not 127.0.0.1 (an existing /etc/hosts entry?)")

    def _restore_hosts(self) -> None:
        if self._hosts_backup is not None:
            if HOSTS.read_bytes() != self._hosts_backup:
                with open(HOSTS, "wb") as f:
                    f.write(self._hosts_backup)
            self._hosts_backup = None

    def _leftover_pids(self) -> list[int]:
        """Processes (slurmstepd, job steps) whose environment names this cluster's config."""
        if self.conf is None:
            return []
        marker = f"SLURM_CONF={self.conf}".encode()
        me, pids = os.getpid(), []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit() or int(p.name) == me:
                continue
            try:
                if marker in (p / "environ").read_bytes().split(b"\0"):
                    pids.append(int(p.name))
            except OSError:
                pass
        return pids

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
                try:
                    self.run("scancel", "--user=root", check=False, timeout=15)
                    end = time.time() + 15
                    while time.time() < end and self.run("squeue", "-h", check=False, timeout=15).stdout.strip():
                        time.sleep(0.5)
                except Exception:
                    pass
            for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
                for name in reversed(list(self.procs)):  # slurmd, slurmctld, then munged
                    p = self.procs[name]
                    if p.poll() is None:
                        try:
                            os.killpg(p.pid, sig)
                        except ProcessLookupError:
                            pass
                end = time.time() + grace
                for p in self.procs.values():
                    try:
                        p.wait(max(0.1, end - time.time()))
                    except subprocess.TimeoutExpired:
                        pass
                for pid in self._leftover_pids():
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                if all(p.poll() is not None for p in self.procs.values()) and not self._leftover_pids():
                    break
        finally:
            self._restore_hosts()
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
            try:
                atexit.unregister(self.close)
                if getattr(self, "_old_sigterm", None) is not None:
                    signal.signal(signal.SIGTERM, self._old_sigterm)
            except Exception:
                pass


def slurm_cluster_fixture():
    """Generator body of the ``slurm_cluster`` pytest fixture (skips when Slurm is unavailable)."""
    import pytest

    try:
        cluster = SlurmCluster().__enter__()
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    try:
        yield cluster
    finally:
        cluster.close()


try:
    import pytest

    slurm_cluster = pytest.fixture(scope="module")(slurm_cluster_fixture)
except ImportError:  # usable as a plain context manager without pytest
    pass


if __name__ == "__main__":  # manual smoke test: python tests/slurm/cluster.py
    with SlurmCluster() as c:
        print(c.run("sinfo", "-N", "-l").stdout)
        print(c.run("srun", "-N2", "hostname").stdout)
