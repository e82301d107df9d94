"""The NCCL/RCCL inter-node transport, read from the debug log, and the check that names a socket fallback's cause.

``nccl_log_plan`` decides which log a rank reads (and turns on NCCL INFO logging when nothing else is set);
``detect_transport`` and ``fallback_clues`` read a log's text; ``check_transport`` (pure, on the gathered records)
warns about TCP sockets between nodes and, when the cluster profile expects Slingshot/CXI (``FI_CXI_*`` or
``NCCL_SOCKET_IFNAME=hsn*`` in ``cluster.env``) or InfiniBand (``NCCL_IB_*``), says the likely cause and what to check.
Stdlib only.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, MutableMapping, Optional, Sequence, Tuple

from launcher.rundir import PREFLIGHT_DIR
from launcher.train.preflight.checks import by_host
from launcher.train.preflight.report import Finding

if TYPE_CHECKING:
    from launcher.config.schema import ClusterConfig

# detect_transport results, slowest first; the slow ones make a multi-node job warn.
TRANSPORTS = ("socket", "ofi-tcp", "ib", "cxi", "ofi", "unknown")
SLOW_TRANSPORTS = ("socket", "ofi-tcp")
# What LUMI's containers must bind for the aws-ofi-rccl plugin to reach Slingshot (libfabric, libcxi, libjansson).
CXI_BINDS = ("/opt/cray", "/usr/lib64/libcxi.so.1", "/usr/lib64/libjansson.so.4")

_SOCKET_STRONG = re.compile(r"Using network Socket\b|via NET/Socket|Initialized NET plugin Socket", re.I)
_SOCKET_WEAK = re.compile(r"NET/Socket\s*:\s*Using\s*\[", re.I)
_IB_STRONG = re.compile(r"Using network IB\b|via NET/IB|Initialized NET plugin IB\b", re.I)
_IB_WEAK = re.compile(r"NET/IB\s*:\s*Using\s*\[", re.I)
_OFI_PROVIDER = re.compile(r"Selected provider is\s+([A-Za-z0-9_;+-]+)", re.I)
_OFI_ANY = re.compile(
    r"NET/OFI|Using network (?:AWS )?Libfabric|via NET/(?:AWS )?Libfabric|Using network OFI|"
    r"Initialized NET plugin (?:AWS )?Libfabric|aws-ofi-[rn]ccl", re.I,
)
_EVIDENCE = re.compile(
    r"Using network|NET/Plugin|NET/IB|NET/Socket|NET/OFI|Selected provider|Initialized NET plugin", re.I
)
# Why a fallback happened, as the log says it (see fallback_clues).
_CLUES = {
    "no-plugin": re.compile(r"NET/Plugin\s*:?\s*(?:No plugin found|Plugin load .*returned|Failed to find|"
                            r".*cannot open shared object)", re.I),
    "ofi-no-provider": re.compile(r"NET/OFI.*(?:No eligible providers|Couldn't find any optimal provider|"
                                  r"Failed to initialize|fi_getinfo.*fail|Unable to find)", re.I),
    "ib-no-device": re.compile(r"NET/IB\s*:\s*No device found", re.I),
}


def detect_transport(log_text: str) -> str:
    """The inter-node transport an NCCL/RCCL ``NCCL_DEBUG=INFO`` log shows.

    Returns ``"socket"`` (NET/Socket: the TCP fallback), ``"ofi-tcp"`` (the libfabric plugin on its tcp/sockets
    provider, also a fallback), ``"ib"`` (NET/IB: InfiniBand/RoCE verbs), ``"cxi"`` (the aws-ofi-rccl/nccl plugin
    on Slingshot's cxi provider), ``"ofi"`` (the libfabric plugin, provider not shown) or ``"unknown"``.
    When the text holds several ranks' logs and they disagree, the slowest transport wins: one node on sockets
    slows every collective of the job.
    """
    text = log_text or ""
    providers = [p.lower().split(";")[0] for p in _OFI_PROVIDER.findall(text)]
    slow_provider = any(p in ("tcp", "sockets", "udp") or p.startswith("tcp") for p in providers)
    if _SOCKET_STRONG.search(text):
        return "socket"
    if slow_provider:
        return "ofi-tcp"
    if "cxi" in providers:
        return "cxi"
    if providers or _OFI_ANY.search(text):
        # The plugin was loaded; a weak socket line (e.g. its bootstrap) does not mean the data path is TCP.
        return "ofi"
    if _IB_STRONG.search(text):
        return "ib"
    if _SOCKET_WEAK.search(text):
        return "socket"
    if _IB_WEAK.search(text):
        return "ib"
    return "unknown"


def transport_evidence(log_text: str, limit: int = 6) -> List[str]:
    """The log lines ``detect_transport`` looked at (first ``limit``), for the report."""
    lines = []
    for line in (log_text or "").splitlines():
        if _EVIDENCE.search(line):
            lines.append(line.strip()[:300])
            if len(lines) >= limit:
                break
    return lines


def fallback_clues(log_text: str) -> List[str]:
    """What the log says about why the fast transport is missing: ``no-plugin`` (the NCCL/RCCL net plugin did not
    load), ``ofi-no-provider`` (the libfabric plugin found no usable provider), ``ib-no-device`` (NET/IB saw no HCA)."""
    return [name for name, pattern in _CLUES.items() if pattern.search(log_text or "")]


def expand_nccl_debug_file(pattern: str, *, host: Optional[str] = None, pid: Optional[int] = None) -> str:
    """NCCL_DEBUG_FILE's ``%h`` (host name up to the first dot) and ``%p`` (pid) substitutions."""
    host = (host or socket.gethostname()).split(".")[0]
    return pattern.replace("%h", host).replace("%p", str(os.getpid() if pid is None else pid))


# ---------------------------------------------------------------------------------------------------------------
# The check (pure)


def expected_fabric(env: Mapping[str, str]) -> Optional[str]:
    """The fabric a profile's environment sets up: ``"cxi"`` (Slingshot: ``FI_CXI_*``, or ``NCCL_SOCKET_IFNAME``
    naming ``hsn`` interfaces), ``"ib"`` (InfiniBand: ``NCCL_IB_*`` other than ``NCCL_IB_DISABLE``), else None."""
    if any(k.startswith("FI_CXI_") for k in env) or "hsn" in str(env.get("NCCL_SOCKET_IFNAME") or ""):
        return "cxi"
    if any(k.startswith("NCCL_IB_") and k != "NCCL_IB_DISABLE" for k in env):
        return "ib"
    return None


def missing_binds(binds: Optional[Sequence[str]], needed: Sequence[str] = CXI_BINDS) -> List[str]:
    """The paths of ``needed`` that no bind (``src`` or ``src:dst[:opts]``) covers; none when ``binds`` is unknown."""
    if binds is None:
        return []
    sources = [str(b).split(":")[0].rstrip("/") for b in binds]
    return [p for p in needed if not any(s and (p == s or p.startswith(s + "/")) for s in sources)]


def _forced(env: Mapping[str, str]) -> List[str]:
    """Settings that turn the fast transport off whatever the container holds."""
    causes = []
    if str(env.get("NCCL_NET") or "").lower() == "socket":
        causes.append("NCCL_NET=Socket forces the socket transport")
    if str(env.get("NCCL_IB_DISABLE") or "").lower() in ("1", "true", "yes"):
        causes.append(f"NCCL_IB_DISABLE={env['NCCL_IB_DISABLE']} turns InfiniBand off")
    provider = env.get("FI_PROVIDER")
    if provider and "cxi" not in provider.lower():
        causes.append(f"FI_PROVIDER={provider} keeps libfabric off cxi")
    return causes


def _cxi_cause(transport: str, clues: Sequence[str], env: Mapping[str, str],
               binds: Optional[Sequence[str]]) -> Tuple[str, str]:
    causes = [c for c in _forced(env) if "InfiniBand" not in c]
    if transport == "ofi-tcp" or "ofi-no-provider" in clues:
        causes.append("the aws-ofi-rccl plugin loaded but libfabric found no usable cxi provider "
                      "(the Cray libfabric and libcxi are not visible in the container)")
    else:
        causes.append("RCCL did not load the aws-ofi-rccl network plugin (librccl-net.so)"
                      + (": the log says it could not be opened" if "no-plugin" in clues else "")
                      + "; it is missing from the image or a library it needs is not bound in")
    missing = missing_binds(binds)
    if missing:
        causes.append(f"cluster.container.binds lacks {', '.join(missing)}")
    hint = ("LUMI: check the container binds /opt/cray, /usr/lib64/libcxi.so.1 and /usr/lib64/libjansson.so.4 "
            "(cluster.container.binds), that the image has the aws-ofi-rccl plugin (librccl-net.so on "
            "LD_LIBRARY_PATH; the NCCL log must say 'Selected Provider is cxi'), FI_PROVIDER unset or cxi, and "
            "NCCL_SOCKET_IFNAME=hsn0,hsn1,hsn2,hsn3")
    return "the profile expects Slingshot (cxi), likely cause: " + "; ".join(causes), hint


def _ib_cause(clues: Sequence[str], env: Mapping[str, str]) -> Tuple[str, str]:
    causes = [c for c in _forced(env) if not c.startswith("FI_PROVIDER")]
    hca = env.get("NCCL_IB_HCA")
    if "ib-no-device" in clues:
        causes.append(f"NET/IB found no device matching NCCL_IB_HCA={hca} (a wrong HCA list, or the container does "
                      "not see the IB devices)" if hca else
                      "NET/IB found no InfiniBand device: the container does not see the IB devices")
    elif not causes:
        causes.append("NET/IB was not usable (see the NET/IB lines of the NCCL log)")
    hint = ("Leonardo: check NCCL_IB_HCA (it must name devices that ibv_devices lists inside the container, "
            "mlx5_0..mlx5_3), that the container sees /dev/infiniband and /sys/class/infiniband, and that "
            "NCCL_IB_DISABLE is not 1")
    return "the profile expects InfiniBand (ib), likely cause: " + "; ".join(causes), hint


GENERIC_HINT = ("LUMI: the container needs the aws-ofi-rccl plugin (log must say 'Selected Provider is cxi'), "
                "NCCL_SOCKET_IFNAME=hsn0,hsn1,hsn2,hsn3 and the /opt/cray, libcxi and libjansson binds; Leonardo: "
                "NET/IB must find the mlx5 devices (check NCCL_IB_HCA, and that the container sees /dev/infiniband)")


def fallback_cause(transport: str, clues: Sequence[str], env: Mapping[str, str],
                   binds: Optional[Sequence[str]] = None) -> Tuple[str, str]:
    """``(cause, hint)`` for a socket fallback: the cause ("" when the profile expects no known fabric) names what
    the environment, the log's ``clues`` and the container ``binds`` point to; the hint says what to check."""
    fabric = expected_fabric(env)
    if fabric == "cxi":
        return _cxi_cause(transport, clues, env, binds)
    if fabric == "ib":
        return _ib_cause(clues, env)
    forced = _forced(env)
    return ("likely cause: " + "; ".join(forced) if forced else ""), GENERIC_HINT


def _fallback_finding(records: Sequence[Mapping[str, Any]], slow: List[str], overall: str, level: str,
                      cluster: Optional["ClusterConfig"]) -> Finding:
    on_slow = [r for r in sorted(records, key=lambda r: r["rank"]) if r["host"] in slow]
    logged = next((r for r in on_slow if r.get("transport_evidence")), on_slow[0])
    evidence = logged.get("transport_evidence") or []
    clues = logged.get("transport_clues")
    clues = fallback_clues("\n".join(evidence)) if clues is None else clues
    env = {**(logged.get("env") or {}), **(cluster.env if cluster is not None else {})}
    binds = cluster.container.binds if cluster is not None and cluster.container is not None else None
    cause, hint = fallback_cause(str(logged.get("transport") or overall), clues, env, binds)
    msg = (f"NCCL/RCCL FELL BACK TO TCP SOCKETS ({overall}) between nodes on host(s) {', '.join(slow[:8])}"
           f"{' ...' if len(slow) > 8 else ''}: inter-node collectives will run at a fraction of "
           f"InfiniBand/Slingshot speed" + (f"; {cause}" if cause else "")
           + (f"; log: {evidence[-1]}" if evidence else ""))
    return Finding(level, "transport", msg, [int(r["rank"]) for r in on_slow], hint)


def check_transport(records: Sequence[Mapping[str, Any]], *, backend: str, fail_on_socket: bool = False,
                    cluster: Optional["ClusterConfig"] = None) -> Tuple[str, List[Finding]]:
    """(5) The transport each node's NCCL log shows; socket fallback between nodes is a loud warning (or a failure)
    that names the likely cause from ``cluster`` (its ``env`` and container binds) and the log."""
    if "nccl" not in backend:
        return "n/a", []
    hosts = by_host(records)
    seen = {r["host"]: r.get("transport") for r in records if r.get("transport") not in (None, "unknown")}
    if not seen:
        msg = ("transport not checked: no NCCL debug log (set NCCL_DEBUG=INFO and NCCL_DEBUG_FILE, or leave NCCL_DEBUG "
               "unset and pass run_dir so the preflight captures one)")
        return "unknown", ([Finding("info", "transport", msg)] if len(hosts) > 1 else [])
    order = {name: i for i, name in enumerate(TRANSPORTS)}  # slowest first
    overall = min(seen.values(), key=lambda t: order.get(t, len(order)))
    slow = sorted(h for h, t in seen.items() if t in SLOW_TRANSPORTS)
    if slow and len(hosts) > 1:
        return overall, [_fallback_finding(records, slow, overall, "fail" if fail_on_socket else "warn", cluster)]
    return overall, []


# ---------------------------------------------------------------------------------------------------------------
# Where a rank's log comes from (runs on every rank)


def nccl_log_plan(backend: str, *, local_rank: int, run_dir: Optional[Path], nccl_log: Any, capture: bool,
                  environ: MutableMapping[str, str]) -> Tuple[Optional[str], Dict[str, Optional[str]]]:
    """Which file to read this rank's NCCL debug output from; sets NCCL_DEBUG* when capturing (returns old values)."""
    if "nccl" not in backend:
        return None, {}
    if nccl_log:
        return expand_nccl_debug_file(str(nccl_log)), {}
    if environ.get("NCCL_DEBUG_FILE"):
        return expand_nccl_debug_file(environ["NCCL_DEBUG_FILE"]), {}
    if not capture or environ.get("NCCL_DEBUG") or local_rank != 0:
        return None, {}
    # NCCL reads these when it first logs (at the communicator's creation: the first collective).
    # One file per node (local rank 0); it keeps the INIT/NET lines of later communicators too.
    folder = (Path(run_dir) / PREFLIGHT_DIR) if run_dir else Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    pattern = str(folder / "nccl-%h-%p.log")
    new = {"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,NET", "NCCL_DEBUG_FILE": pattern}
    old = {k: environ.get(k) for k in new}
    environ.update(new)
    return expand_nccl_debug_file(pattern), old


def restore_env(old: Mapping[str, Optional[str]], environ: MutableMapping[str, str]) -> None:
    """Undo ``nccl_log_plan``'s settings (NCCL has read them; child processes need not inherit them)."""
    for key, value in old.items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value


def read_transport(path: Optional[str]) -> Dict[str, Any]:
    """``transport``, ``transport_evidence`` and ``transport_clues`` from this rank's log (None/empty without one)."""
    text = None
    if path:
        try:
            with open(path, errors="replace") as fh:
                text = fh.read(4 * 2**20)
        except OSError:
            text = None
    if text is None:
        return {"transport": None, "transport_evidence": [], "transport_clues": []}
    return {"transport": detect_transport(text), "transport_evidence": transport_evidence(text),
            "transport_clues": fallback_clues(text)}
