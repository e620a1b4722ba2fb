"""Several hosts on one machine, for real: each is a Linux network namespace with its own address,
network stack, hostname and /etc/hosts, and they meet on a bridge in a namespace of its own, so
nothing touches this machine's own network. MPI and the stream link between them really cross TCP.

Open MPI reaches a host through a launch agent, as it would through ssh: `agent HOST COMMAND` runs
COMMAND on HOST with a fresh environment (PATH and HOME only). Commands of the test run on a host
through `host.command(argv)`. `cut(host)` takes a host's link down (the host goes away without a
word, as when a cable or a switch port dies), and `limit(rate)` makes every link a `tc tbf` link of
that rate, both ways.

    with VirtualHosts(engine_hosts=2) as hosts:
        subprocess.run(hosts.client.command(["mpiexec", *hosts.mpi_args(), "-n", "2", ...]))

Everything made is removed on leaving, also after a failure: the namespaces' processes are killed,
then the namespaces (and with them their links) and their /etc/netns folders are deleted. Names carry
this process's id; leftovers of a process that is gone are removed on the next start.
"""
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

SUBNET = "10.231.0"  # private, and seen only inside the namespaces: every harness has its own bridge
PREFIX = "llaisys-vh"
# The ports that the README's set-up for several machines fixes, so that a firewall can let them through.
CONTROLLER_PORTS = range(10101, 10131)  # ipcontroller (it needs at least 16)
MPI_PORTS = range(10200, 10300)         # the ranks' TCP transport
DAEMON_PORTS = range(10300, 10301)      # mpiexec's daemons: one port, the same on every host
NETNS_ETC = Path("/etc/netns")
_made = itertools.count()
# The README's advice for several hosts: all-reduce by recursive doubling. For the exact reduction's
# 7 KiB messages at 3 ranks, Open MPI's own choice took 12.7-15.0 ms per decode step's collectives
# here against 8.6-9.5 (docs/benchmarks.md); the sums are exact, so the tokens do not change.
ALLREDUCE_ALGORITHM = ("--mca", "coll_tuned_use_dynamic_rules", "1", "--mca", "coll_tuned_allreduce_algorithm", "3")


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "virtual hosts need root (network namespaces)"
    for tool in ("ip", "unshare", "tc"):
        if shutil.which(tool) is None:
            return f"virtual hosts need the `{tool}` command"
    probe = f"{PREFIX}-probe-{os.getpid()}"
    made = _run(["ip", "netns", "add", probe], check=False)
    if made.returncode != 0:
        return f"network namespaces are not permitted here ({made.stderr.strip()})"
    _run(["ip", "netns", "del", probe], check=False)
    return None


@dataclass
class Host:
    name: str     # its hostname, in every host's /etc/hosts
    address: str
    netns: str
    link: str     # its port on the bridge (in the switch namespace)

    def command(self, argv: list[str], env: dict | None = None) -> list[str]:
        """argv run on this host (its namespace and hostname), with env added to this environment."""
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                self.name, "env", *extra, *map(str, argv)]


class VirtualHosts:
    """A client host (`client`) and engine_hosts engine hosts (`node1`, ...) on one bridge."""

    def __init__(self, engine_hosts: int, slots: int = 1, without_files: tuple[str, ...] = ()):
        """without_files: engine hosts (e.g. "node2") whose commands get an empty home folder of their
        own, so that they hold no model files and cache nothing where the others look."""
        self.slots, self.without_files = slots, without_files
        tag = f"{PREFIX}-{os.getpid()}-{next(_made)}"  # several harnesses may live at once in one process
        names = ["client"] + [f"node{i}" for i in range(1, engine_hosts + 1)]
        self.all = [Host(name, f"{SUBNET}.{10 + i}", f"{tag}-{name}", f"port{i}") for i, name in enumerate(names)]
        self.client, self.nodes = self.all[0], self.all[1:]
        self.switch = f"{tag}-switch"
        self.folder = Path(tempfile.mkdtemp(prefix="llaisys-vh-"))

    def __enter__(self):
        remove_stale()
        try:
            self._make()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc):
        self.remove()

    def _make(self) -> None:
        _run(["ip", "netns", "add", self.switch])
        _run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.switch, "link", "set", "br0", "up"])
        hosts_file = "127.0.0.1 localhost\n" + "".join(f"{h.address} {h.name}\n" for h in self.all)
        for h in self.all:
            _run(["ip", "netns", "add", h.netns])
            (NETNS_ETC / h.netns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / h.netns / "hosts").write_text(hosts_file)  # `ip netns exec` mounts it on /etc/hosts
            _run(["ip", "link", "add", h.link, "netns", self.switch, "type", "veth", "peer", "name", "eth0",
                  "netns", h.netns])
            _run(["ip", "-n", self.switch, "link", "set", h.link, "master", "br0", "up"])
            _run(["ip", "-n", h.netns, "addr", "add", f"{h.address}/24", "dev", "eth0"])
            _run(["ip", "-n", h.netns, "link", "set", "eth0", "up"])
            _run(["ip", "-n", h.netns, "link", "set", "lo", "up"])
        (self.folder / "hostfile").write_text("".join(f"{h.name} slots={self.slots}\n" for h in self.nodes))
        # Each engine host gets a core of its own (in turn, when there are more hosts than cores), so
        # that its ranks size their threads for one host's cores, not for the whole machine's.
        cores = sorted(os.sched_getaffinity(0))
        cpus = {h.name: str(cores[i % len(cores)]) for i, h in enumerate(self.nodes)}
        cpus[self.client.name] = ",".join(map(str, cores))
        homes = {h.name: '"$HOME"' for h in self.all}
        for name in self.without_files:
            (self.folder / f"home-{name}").mkdir()
            homes[name] = str(self.folder / f"home-{name}")
        cases = "".join(f"    {h.name}) ns={h.netns}; cpus={cpus[h.name]}; home={homes[h.name]} ;;\n" for h in self.all)
        agent = self.folder / "agent"
        agent.write_text(f"""#!/bin/sh
# Open MPI's launch agent for the virtual hosts: "agent HOST COMMAND" runs COMMAND on HOST the way
# ssh would: in HOST's network namespace, under its hostname, with a fresh environment, on HOST's cores.
host=$1; shift
case $host in
{cases}    *) echo "agent: unknown host $host" >&2; exit 255 ;;
esac
exec ip netns exec "$ns" unshare --uts taskset -c "$cpus" env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$home" \\
    sh -c 'hostname "$0" && exec sh -c "$1"' "$host" "$*"
""")
        agent.chmod(0o755)

    def home(self, name: str) -> Path:
        """The home folder of a host made without files."""
        return self.folder / f"home-{name}"

    def mpi_args(self) -> list[str]:
        """mpiexec's arguments that place ranks on the engine hosts through the agent.

        Waiting ranks yield their core: the hosts share this machine's cores, and the kernel work that
        carries a packet across the bridge waited for the scheduler's tick behind ranks that busy-poll
        (measured: 8 ms per 7 KB all-reduce, against 0.17 ms when they yield). Separate machines
        handle their packets in their own interrupts and need no such setting."""
        return ["--hostfile", str(self.folder / "hostfile"), "--prtemca", "plm_ssh_agent", str(self.folder / "agent"),
                "--prtemca", "plm_ssh_no_tree_spawn", "1", "--mca", "mpi_yield_when_idle", "1",
                "--mca", "btl_tcp_port_min_v4", str(MPI_PORTS.start), "--mca", "btl_tcp_port_range_v4", str(len(MPI_PORTS)),
                "--prtemca", "oob_tcp_static_ipv4_ports", str(DAEMON_PORTS.start),
                *ALLREDUCE_ALGORITHM]

    @contextlib.contextmanager
    def ipcluster(self, ipython_dir: Path, ranks: int):
        """`ipcluster start --engines=MPI -n ranks` on the client host, its controller listening on the
        client's address and its engines placed on the engine hosts; yields the environment (IPYTHONDIR,
        PATH) for the client host's commands, and stops the cluster afterwards."""
        bin_dir = Path(sys.executable).parent
        profile = ipython_dir / "profile_default"
        profile.mkdir(parents=True, exist_ok=True)
        (profile / "ipcontroller_config.py").write_text(
            f"c.IPController.ip = {self.client.address!r}\n"
            f"c.IPController.ports = list(range({CONTROLLER_PORTS.start}, {CONTROLLER_PORTS.stop}))\n"
            "c.HeartMonitor.period = 500\n")
        # The engines find the controller's connection file through IPYTHONDIR, which mpiexec must pass
        # on (-x): a host's commands start with a fresh environment, as over ssh.
        (profile / "ipcluster_config.py").write_text(
            f"c.MPILauncher.mpi_cmd = [{str(bin_dir / 'mpiexec')!r}]\n"
            f"c.MPILauncher.mpi_args = {[*self.mpi_args(), '-x', 'IPYTHONDIR']!r}\n")
        env = {"IPYTHONDIR": str(ipython_dir), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        subprocess.run(self.client.command([bin_dir / "ipcluster", "start", "--engines=MPI", "-n", str(ranks),
                                            "--daemonize"], env), check=True, capture_output=True, timeout=60)
        try:
            yield env
        finally:
            subprocess.run(self.client.command([bin_dir / "ipcluster", "stop"], env), capture_output=True, timeout=60)

    def connections(self, host: Host) -> list[tuple[str, int, str, int]]:
        """The host's established TCP connections to other hosts: (address, port, peer address, peer port)."""
        out = _run(["ip", "netns", "exec", host.netns, "ss", "-Htn", "state", "established"]).stdout
        found = []
        for line in out.splitlines():
            (address, port), (peer, peer_port) = (end.rsplit(":", 1) for end in line.split()[2:4])
            if not address.startswith(("127.", "[::1]")):
                found.append((address, int(port), peer, int(peer_port)))
        return found

    def cut(self, host: Host) -> None:
        """Take the host's link down: its packets go nowhere, and nobody is told."""
        _run(["ip", "-n", self.switch, "link", "set", host.link, "down"])

    def limit(self, rate: str | None) -> None:
        """Every link limited to rate (tc's units, e.g. "1gbit") in both directions, or unlimited."""
        for h in self.all:
            for netns, dev in ((h.netns, "eth0"), (self.switch, h.link)):
                _run(["tc", "-n", netns, "qdisc", "del", "dev", dev, "root"], check=False)
                if rate is not None:
                    # Bucket: a few ms of the rate (at least 64 KB, so that one big message can pass).
                    burst = max(64 * 1024, _bits_per_second(rate) // 8 // 250)
                    _run(["tc", "-n", netns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst",
                          str(burst), "latency", "100ms"])

    def link_bytes(self) -> dict[str, int]:
        """Bytes each host has sent on its link so far (what its bridge port received)."""
        ports = json.loads(_run(["ip", "-n", self.switch, "-j", "-s", "link", "show"]).stdout)
        received = {p["ifname"]: p["stats64"]["rx"]["bytes"] for p in ports}
        return {h.name: received[h.link] for h in self.all}

    def remove(self) -> None:
        """Kill what runs on the hosts, delete the namespaces and their files."""
        for netns in [h.netns for h in self.all] + [self.switch]:
            _remove_netns(netns)
        shutil.rmtree(self.folder, ignore_errors=True)


def remove_stale() -> None:
    """Namespaces of harnesses whose process is gone (killed before it could clean up)."""
    listing = _run(["ip", "netns", "list"], check=False).stdout
    for netns in re.findall(rf"^({PREFIX}-(\d+)-\S+)", listing, re.M):
        name, pid = netns
        if not Path(f"/proc/{pid}").exists():
            _remove_netns(name)


def _remove_netns(netns: str) -> None:
    pids = _run(["ip", "netns", "pids", netns], check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass
    _run(["ip", "netns", "del", netns], check=False)
    shutil.rmtree(NETNS_ETC / netns, ignore_errors=True)


def _bits_per_second(rate: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kmg]?)bit", rate.lower()).groups()
    return int(number) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[unit]


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done
