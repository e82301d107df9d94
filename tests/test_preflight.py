"""Preflight (launcher.train.preflight): pure checks on fabricated records, NCCL/RCCL transport detection and the
socket-fallback cause on fabricated debug logs, and real 2-process runs (gloo, CPU).

The process tests start ``python -m torch.distributed.run --standalone --nproc_per_node 2`` on a small script written
into tmp_path: a passing run, a run that requires a GPU on this CPU-only machine (both ranks must stop with the
same message), and a rank that never arrives (the watchdog must end the job). About 20 s in all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from launcher.config.schema import ClusterConfig, ContainerConfig
from launcher.train import preflight as P
from launcher.train.preflight import (
    EXIT_PREFLIGHT,
    PreflightReport,
    check_bandwidth,
    check_cpu_binding,
    check_devices,
    check_gpu_sharing,
    check_records,
    check_transport,
    detect_transport,
    format_failure,
    format_ints,
    parse_ints,
    relevant_env,
)
from launcher.train.preflight import records as R
from launcher.train.preflight.transport import expected_fabric, fallback_clues, missing_binds, read_transport
from login_helpers import LEONARDO_ACCOUNT, LUMI_ACCOUNT, config

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# Fabricated records


def rec(rank, host="nid005001", local=None, *, device="cuda:0", gpu_count=1, gpu_id=None, kind="pci", cpus="0-6",
        visible=None, transport=None, **extra):
    local = rank if local is None else local
    r = {
        "rank": rank, "local_rank": local, "host": host, "pid": 1000 + rank, "device": device,
        "device_type": device.split(":")[0], "gpu_count": gpu_count, "visible": visible or {},
        "gpu_name": "AMD Instinct MI250X" if device.startswith("cuda") else None,
        "gpu_id": gpu_id if gpu_id is not None else (f"0000:{0xc1 + local:02x}:00" if device.startswith("cuda") else None),
        "gpu_id_kind": kind if device.startswith("cuda") else None,
        "cpus": cpus, "n_cpus": len(parse_ints(cpus)), "numa_cpu": [0], "numa_gpu": None, "transport": transport,
    }
    r.update(extra)
    return r


# LUMI's 7-core masks per GCD (cluster.cpu_bind): 49-55, 57-63, 17-23, 25-31, 1-7, 9-15, 33-39, 41-47.
LUMI_CPUS = ["49-55", "57-63", "17-23", "25-31", "1-7", "9-15", "33-39", "41-47"]


def lumi_node(host, first_rank):
    return [rec(first_rank + i, host, i, cpus=LUMI_CPUS[i], visible={"ROCR_VISIBLE_DEVICES": str(i)})
            for i in range(8)]


def test_format_and_parse_cpu_lists():
    assert format_ints([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"
    assert format_ints([]) == ""
    assert parse_ints("0-3,8,10-11") == {0, 1, 2, 3, 8, 10, 11}
    assert parse_ints(format_ints(range(49, 56))) == set(range(49, 56))


def test_relevant_env_keeps_comm_vars_and_never_secrets():
    env = {
        "NCCL_SOCKET_IFNAME": "hsn0,hsn1,hsn2,hsn3", "FI_CXI_DEFAULT_CQ_SIZE": "131072", "OMP_NUM_THREADS": "7",
        "ROCR_VISIBLE_DEVICES": "3", "HF_TOKEN": "hf_x", "WANDB_API_KEY": "k", "NCCL_SECRET_THING": "s",
        "FI_PASSWORD": "p", "AWS_SECRET_ACCESS_KEY": "a", "PATH": "/usr/bin", "HOME": "/root",
    }
    out = relevant_env(env)
    assert out == {"NCCL_SOCKET_IFNAME": "hsn0,hsn1,hsn2,hsn3", "FI_CXI_DEFAULT_CQ_SIZE": "131072",
                   "OMP_NUM_THREADS": "7", "ROCR_VISIBLE_DEVICES": "3"}


def test_healthy_two_lumi_nodes_have_no_findings():
    records = lumi_node("nid005001", 0) + lumi_node("nid005002", 8)
    findings = check_records(records, world_size=16, require_device=True, device_name="mi250x_gcd", cpus_per_task=7)
    assert findings == []


def test_duplicate_gpu_on_one_host_fails_and_names_both_ranks():
    records = lumi_node("nid005001", 0) + lumi_node("nid005002", 8)
    # Rank 3 got GCD 2's bus id (e.g. ROCR_VISIBLE_DEVICES not set per task): it shares a GCD with rank 2.
    records[3] = rec(3, "nid005001", 3, gpu_id=records[2]["gpu_id"], cpus=LUMI_CPUS[3])
    findings = check_gpu_sharing(records)
    assert [(f.level, f.check, f.ranks) for f in findings] == [("fail", "gpu_sharing", [2, 3])]
    msg = findings[0].message
    assert "nid005001" in msg and "rank 2" in msg and "rank 3" in msg and records[2]["gpu_id"] in msg
    # The same bus id on different hosts is two different GPUs.
    other = [rec(0, "a", 0, gpu_id="0000:c1:00"), rec(1, "b", 0, gpu_id="0000:c1:00")]
    assert check_gpu_sharing(other) == []
    # Only the visible index known (cgroups may show every task its own GPU as 0): a warning, not a failure.
    weak = [rec(0, "a", 0, gpu_id="0", kind="index"), rec(1, "a", 1, gpu_id="0", kind="index")]
    assert [f.level for f in check_gpu_sharing(weak)] == ["warn"]
    report = _report(check_records(records, world_size=16, require_device=True))
    assert not report.ok and "same GPU" in format_failure(report)


def test_device_required_names_rank_host_and_what_it_saw():
    records = [rec(0, "lrdn0001", 0, visible={"CUDA_VISIBLE_DEVICES": "0"}),
               rec(1, "lrdn0001", 1, device="cuda:0", gpu_id="0000:56:00"),
               rec(2, "lrdn0002", 0, device="cpu", gpu_count=0, visible={"CUDA_VISIBLE_DEVICES": ""})]
    findings = check_devices(records, require_device=True, device_name="a100_64gb")
    fails = [f for f in findings if f.level == "fail"]
    assert fails[0].ranks == [2]
    assert "rank 2 (host lrdn0002, local rank 0): no GPU visible" in fails[0].message
    assert "cluster.device=a100_64gb" in fails[0].message and "device_count()=0" in fails[0].message
    assert "CUDA_VISIBLE_DEVICES=''" in fails[0].message
    assert any("different kinds of device" in f.message for f in fails)  # cuda on 0-1, cpu on 2
    # Not required: CPU ranks are fine.
    cpu = [rec(0, "h", device="cpu", gpu_count=0), rec(1, "h", device="cpu", gpu_count=0)]
    assert check_devices(cpu, require_device=False) == []
    # Sees GPUs but runs on CPU.
    lazy = [rec(0, "h", device="cpu", gpu_count=4)]
    assert "sees 4 GPU(s) but runs on cpu" in check_devices(lazy, require_device=True)[0].message


def test_cpu_binding_overlap_and_too_few_cpus():
    same = [rec(0, "h", 0, cpus="0-15"), rec(1, "h", 1, cpus="0-15")]
    f = check_cpu_binding(same)
    assert len(f) == 1 and f[0].level == "warn" and "no per-rank CPU binding" in f[0].message
    overlap = [rec(0, "h", 0, cpus="0-7"), rec(1, "h", 1, cpus="6-13"), rec(2, "h", 2, cpus="14-21")]
    f = check_cpu_binding(overlap)
    assert len(f) == 1 and "ranks 0 and 1 share CPU(s) 6-7" in f[0].message and f[0].ranks == [0, 1]
    few = [rec(0, "h", 0, cpus="1"), rec(1, "h", 1, cpus="9-15")]
    f = check_cpu_binding(few, cpus_per_task=7)
    assert len(f) == 1 and f[0].ranks == [0] and "cluster.cpus_per_task=7" in f[0].message
    # One rank per host: nothing to compare.
    assert check_cpu_binding([rec(0, "a"), rec(1, "b")]) == []


def test_bandwidth_thresholds():
    bw = P.bandwidth_summary(32 * 2**20, [0.001, 0.002], 16)
    assert bw["busbw_gbps"] == pytest.approx(32 * 2**20 / 0.002 / 1e9 * 2 * 15 / 16)
    assert check_bandwidth(bw, expected_busbw_gbps=None) == []
    assert check_bandwidth(bw, expected_busbw_gbps=bw["busbw_gbps"] * 1.5) == []  # 67%: fine
    low = check_bandwidth(bw, expected_busbw_gbps=bw["busbw_gbps"] * 4)
    assert [f.level for f in low] == ["warn"] and "25.0% of the expected" in low[0].message
    fail = check_bandwidth(bw, expected_busbw_gbps=bw["busbw_gbps"] * 4, fail_fraction=0.3)
    assert [f.level for f in fail] == ["fail"]
    assert P.bandwidth_summary(4096, [0.0], 1)["busbw_gbps"] is None


# ---------------------------------------------------------------------------------------------------------------
# NCCL / RCCL transport

LEONARDO_IB = """\
lrdn0001:12345:12345 [0] NCCL INFO Bootstrap : Using ib0:10.128.0.1<0>
lrdn0001:12345:12345 [0] NCCL INFO NET/Plugin: No plugin found (libnccl-net.so)
lrdn0001:12345:12345 [0] NCCL INFO NET/IB : Using [0]mlx5_0:1/IB [1]mlx5_1:1/IB [2]mlx5_2:1/IB [3]mlx5_3:1/IB ; OOB ib0:10.128.0.1<0>
lrdn0001:12345:12345 [0] NCCL INFO Using network IB
lrdn0001:12345:12401 [0] NCCL INFO Channel 00/0 : 3[3] -> 4[0] [send] via NET/IB/0/GDRDMA
"""
LEONARDO_SOCKET = """\
lrdn0002:2345:2345 [0] NCCL INFO NET/Plugin: No plugin found (libnccl-net.so)
lrdn0002:2345:2345 [0] NCCL INFO NET/IB : No device found.
lrdn0002:2345:2345 [0] NCCL INFO NET/Socket : Using [0]ib0:10.128.0.2<0>
lrdn0002:2345:2345 [0] NCCL INFO Using network Socket
lrdn0002:2345:2401 [0] NCCL INFO Channel 00/0 : 3[3] -> 4[0] [send] via NET/Socket/0
"""
LUMI_CXI = """\
nid005001:1234:1234 [0] NCCL INFO NET/OFI Using aws-ofi-rccl 1.4.0
nid005001:1234:1234 [0] NCCL INFO NET/OFI Selected Provider is cxi (found 4 nics)
nid005001:1234:1234 [0] NCCL INFO Using network AWS Libfabric
nid005001:1234:1300 [0] NCCL INFO Channel 00/0 : 7[7] -> 8[0] [send] via NET/AWS Libfabric/0/GDRDMA
"""
LUMI_NO_PLUGIN = """\
nid005002:1234:1234 [0] NCCL INFO NET/Plugin : Plugin load (librccl-net.so) returned 2 : librccl-net.so: cannot open shared object file: No such file or directory
nid005002:1234:1234 [0] NCCL INFO NET/Plugin : No plugin found, using internal implementation
nid005002:1234:1234 [0] NCCL INFO NET/IB : No device found.
nid005002:1234:1234 [0] NCCL INFO NET/Socket : Using [0]hsn0:10.253.6.71<0> [1]hsn1:10.253.6.72<0>
nid005002:1234:1234 [0] NCCL INFO Using network Socket
"""


@pytest.mark.parametrize("text, expected", [
    (LEONARDO_IB, "ib"),
    (LEONARDO_SOCKET, "socket"),
    (LUMI_CXI, "cxi"),
    (LUMI_NO_PLUGIN, "socket"),
    # Newer aws-ofi-nccl/rccl wording.
    ("x [0] NCCL INFO NET/OFI Selected provider is cxi, fabric is cxi (found 4 nics)\n", "cxi"),
    # The plugin loaded, but libfabric picked TCP (no Slingshot in the container): also a fallback.
    ("x [0] NCCL INFO NET/OFI Selected Provider is tcp;ofi_rxm (found 1 nics)\nx NCCL INFO Using network AWS Libfabric\n",
     "ofi-tcp"),
    ("x [0] NCCL INFO Using network AWS Libfabric\n", "ofi"),
    ("x [0] NCCL INFO Channel 00/0 : 1[1] -> 2[0] [send] via NET/IB/0\n", "ib"),
    ("x [0] NCCL INFO NET/IB : Using [0]mlx5_0:1/IB ; OOB ib0:10.0.0.1<0>\n", "ib"),
    # Single-node logs (P2P/SHM only) and other noise say nothing about the network.
    ("x [0] NCCL INFO Channel 00/0 : 0[0] -> 1[1] via P2P/IPC\nx NCCL INFO comm 0x1 rank 0 nranks 2 - Init COMPLETE\n",
     "unknown"),
    ("", "unknown"),
    # Several ranks' logs in one file: one node on sockets is what matters.
    (LEONARDO_IB + LEONARDO_SOCKET, "socket"),
    (LUMI_CXI + LUMI_NO_PLUGIN, "socket"),
])
def test_detect_transport(text, expected):
    assert detect_transport(text) == expected


def test_transport_evidence_and_nccl_debug_file_pattern():
    assert P.transport_evidence(LUMI_CXI)[1].endswith("Selected Provider is cxi (found 4 nics)")
    assert P.expand_nccl_debug_file("/r/nccl-%h-%p.log", host="nid005001.lumi", pid=7) == "/r/nccl-nid005001-7.log"


def test_socket_fallback_warns_loudly_only_between_nodes():
    records = [rec(0, "lrdn0001", transport="ib", transport_evidence=["Using network IB"]),
               rec(1, "lrdn0002", transport="socket", transport_evidence=["x NCCL INFO Using network Socket"])]
    overall, findings = check_transport(records, backend="nccl")
    assert overall == "socket"
    assert [(f.level, f.ranks) for f in findings] == [("warn", [1])]
    assert "FELL BACK TO TCP SOCKETS" in findings[0].message and "lrdn0002" in findings[0].message
    _, findings = check_transport(records, backend="nccl", fail_on_socket=True)
    assert findings[0].level == "fail"
    # One node: sockets carry no inter-node traffic.
    one = [rec(0, "h", transport="socket"), rec(1, "h", 1, transport="socket")]
    assert check_transport(one, backend="nccl")[1] == []
    assert check_transport(records, backend="gloo") == ("n/a", [])
    overall, findings = check_transport([rec(0, "a"), rec(1, "b")], backend="nccl")
    assert overall == "unknown" and [f.level for f in findings] == ["info"]


LUMI_OFI_TCP = """\
nid005002:1234:1234 [0] NCCL INFO NET/OFI Using aws-ofi-rccl 1.4.0
nid005002:1234:1234 [0] NCCL INFO NET/OFI Selected Provider is tcp;ofi_rxm (found 1 nics)
nid005002:1234:1234 [0] NCCL INFO Using network AWS Libfabric
"""
LUMI_ENV = {"NCCL_SOCKET_IFNAME": "hsn0,hsn1,hsn2,hsn3", "FI_CXI_DEFAULT_CQ_SIZE": "131072", "OMP_NUM_THREADS": "7"}
LUMI_BINDS = ["/var/spool/slurmd", "/opt/cray", "/usr/lib64/libcxi.so.1", "/pfs", "/scratch"]  # no libjansson


def cluster(name, env, binds=None, **extra):
    container = ContainerConfig(image="/x.sif", binds=list(binds)) if binds is not None else None
    return ClusterConfig(name=name, partition="p", device="mi250x_gcd" if name == "lumi" else "a100_64gb",
                         backend="nccl", env=dict(env), container=container, **extra)


def two_nodes(tmp_path, good, bad, hosts=("nid005001", "nid005002")):
    """Records of two nodes whose local rank 0 read these NCCL logs (as run_preflight's phase 2 stores them)."""
    records = []
    for rank, (host, text) in enumerate(zip(hosts, (good, bad))):
        log = tmp_path / f"nccl-{host}.log"
        log.write_text(text)
        records.append(rec(rank, host, 0, **read_transport(str(log))))
    return records


def test_lumi_socket_fallback_names_the_plugin_and_the_missing_bind(tmp_path):
    records = two_nodes(tmp_path, LUMI_CXI, LUMI_NO_PLUGIN)
    assert records[1]["transport"] == "socket" and records[1]["transport_clues"] == ["no-plugin", "ib-no-device"]
    overall, [finding] = check_transport(records, backend="nccl", cluster=cluster("lumi", LUMI_ENV, LUMI_BINDS))
    assert overall == "socket" and finding.level == "warn" and finding.ranks == [1]
    msg = finding.message
    assert "FELL BACK TO TCP SOCKETS" in msg and "nid005002" in msg
    assert "the profile expects Slingshot (cxi), likely cause: RCCL did not load the aws-ofi-rccl network plugin" in msg
    assert "the log says it could not be opened" in msg
    assert "cluster.container.binds lacks /usr/lib64/libjansson.so.4" in msg and "libcxi.so.1," not in msg
    for what in ("/opt/cray", "/usr/lib64/libcxi.so.1", "/usr/lib64/libjansson.so.4", "aws-ofi-rccl",
                 "Selected Provider is cxi", "NCCL_SOCKET_IFNAME"):
        assert what in finding.hint
    # A bind of the parent folder covers the libraries; src:dst binds count by their source.
    assert missing_binds(["/opt/cray:/opt/cray:ro", "/usr/lib64"]) == []
    assert missing_binds(None) == []  # no container: nothing to name


def test_lumi_plugin_on_tcp_provider_names_libfabric_and_cxi(tmp_path):
    records = two_nodes(tmp_path, LUMI_CXI, LUMI_OFI_TCP)
    binds = LUMI_BINDS + ["/usr/lib64/libjansson.so.4"]
    overall, [finding] = check_transport(records, backend="nccl", fail_on_socket=True,
                                         cluster=cluster("lumi", LUMI_ENV, binds))
    assert overall == "ofi-tcp" and finding.level == "fail"
    assert "libfabric found no usable cxi provider" in finding.message and "lacks" not in finding.message
    # A rank environment that forces the provider is named first.
    records[1]["env"] = {"FI_PROVIDER": "tcp"}
    _, [finding] = check_transport(records, backend="nccl", cluster=cluster("lumi", LUMI_ENV, binds))
    assert "likely cause: FI_PROVIDER=tcp keeps libfabric off cxi; the aws-ofi-rccl plugin loaded" in finding.message


def test_leonardo_socket_fallback_names_the_ib_devices_and_hca(tmp_path):
    hosts = ("lrdn0001", "lrdn0002")
    records = two_nodes(tmp_path, LEONARDO_IB, LEONARDO_SOCKET, hosts)
    # NCCL on Leonardo never loads a net plugin (NET/IB is built in): only the IB clue matters there.
    assert records[1]["transport_clues"] == ["no-plugin", "ib-no-device"]
    env = {"NCCL_IB_TIMEOUT": "23", "NCCL_IB_HCA": "mlx5_0,mlx5_1,mlx5_2,mlx5_3"}
    _, [finding] = check_transport(records, backend="nccl", cluster=cluster("leonardo", env, []))
    assert ("the profile expects InfiniBand (ib), likely cause: NET/IB found no device matching "
            "NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3") in finding.message
    assert "NCCL_IB_HCA" in finding.hint and "/dev/infiniband" in finding.hint and "libcxi" not in finding.hint
    _, [finding] = check_transport(records, backend="nccl", cluster=cluster("leonardo", {"NCCL_IB_TIMEOUT": "23"}))
    assert "NET/IB found no InfiniBand device: the container does not see the IB devices" in finding.message
    env = {"NCCL_IB_TIMEOUT": "23", "NCCL_IB_DISABLE": "1"}
    _, [finding] = check_transport(records, backend="nccl", cluster=cluster("leonardo", env))
    assert "likely cause: NCCL_IB_DISABLE=1 turns InfiniBand off" in finding.message


def test_fallback_without_a_known_fabric_keeps_the_general_hint(tmp_path):
    records = two_nodes(tmp_path, LEONARDO_IB, LEONARDO_SOCKET, ("a", "b"))
    _, [finding] = check_transport(records, backend="nccl")  # no profile, no fabric variables
    assert "likely cause" not in finding.message
    assert "LUMI:" in finding.hint and "Leonardo:" in finding.hint
    # Fabricated records that carry only the evidence lines still give the clue.
    del records[1]["transport_clues"]
    _, [finding] = check_transport(records, backend="nccl", cluster=cluster("leonardo", {"NCCL_IB_TIMEOUT": "23"}))
    assert "NET/IB found no InfiniBand device" in finding.message
    assert fallback_clues(LUMI_CXI) == [] and fallback_clues("") == []


def test_the_real_profiles_expect_their_fabrics():
    lumi = config(["+cluster=lumi", LUMI_ACCOUNT]).cluster
    leonardo = config(["+cluster=leonardo", LEONARDO_ACCOUNT, "cluster.container.image=/x/l.sif"]).cluster
    assert expected_fabric(lumi.env) == "cxi" and expected_fabric(leonardo.env) == "ib"
    assert expected_fabric(config(["+cluster=local_slurm"]).cluster.env) is None


# ---------------------------------------------------------------------------------------------------------------
# GPU identity without a GPU (a fake torch)


def _fake_torch(props, hip="6.2"):
    cuda = SimpleNamespace(current_device=lambda: 0, get_device_properties=lambda i: props)
    return SimpleNamespace(cuda=cuda, version=SimpleNamespace(hip=hip, cuda=None))


def test_gpu_identity_prefers_pci_then_uuid_then_index():
    dev = SimpleNamespace(type="cuda", index=0)
    env = {"ROCR_VISIBLE_DEVICES": "4,5"}
    info = R._gpu_info(_fake_torch(SimpleNamespace(name="MI250X", pci_bus_id=0xd1, pci_device_id=0,
                                                   pci_domain_id=0, uuid="GPU-0000")), dev, env)
    assert (info["gpu_id_kind"], info["gpu_id"], info["gpu_physical"]) == ("pci", "0000:d1:00", "4")
    info = R._gpu_info(_fake_torch(SimpleNamespace(name="A100", uuid="GPU-5b1c"), hip=None), dev,
                       {"CUDA_VISIBLE_DEVICES": "2"})
    assert (info["gpu_id_kind"], info["gpu_id"]) == ("uuid", "GPU-5b1c")
    # Blank (all-zero) UUIDs, as some ROCm versions report, are no identity.
    info = R._gpu_info(_fake_torch(SimpleNamespace(name="MI250X", uuid="00000000-0000-0000-0000-000000000000")),
                       SimpleNamespace(type="cuda", index=1), {"ROCR_VISIBLE_DEVICES": "6,7"})
    assert (info["gpu_id_kind"], info["gpu_id"]) == ("index", "7")
    assert R._physical_gpu(1, {"ROCR_VISIBLE_DEVICES": "2,3,4", "HIP_VISIBLE_DEVICES": "2,0"}, hip=True) == "2"


# ---------------------------------------------------------------------------------------------------------------
# Messages


def _report(findings, records=None, world_size=16):
    records = records or [rec(i, f"nid{i // 8:03d}", i % 8) for i in range(world_size)]
    return PreflightReport(ok=P.decide(findings), world_size=world_size, hosts=sorted({r["host"] for r in records}),
                           findings=list(findings), records=records, bandwidth={"skipped": "a device check failed"},
                           transport="not checked", backend="nccl", elapsed_s=0.1, json_path="/run/preflight.json")


def test_failure_message_is_capped_and_says_how_to_skip():
    records = [rec(i, f"nid{i // 8:03d}", i % 8, device="cpu", gpu_count=0) for i in range(40)]
    report = _report(check_devices(records, require_device=True, device_name="mi250x_gcd"), records, 40)
    msg = format_failure(report)
    assert msg.startswith("preflight failed on 40 of 40 rank(s), 5 host(s): training not started")
    assert "rank 7 (host nid000, local rank 7): no GPU visible" in msg
    assert "rank 8 " not in msg and "and 32 more (preflight.json)" in msg
    assert "train.preflight=false" in msg and "/run/preflight.json" in msg
    table = report.format_table(max_rows=4)
    assert "more rank(s) in preflight.json" not in table  # every failing rank is shown


def test_module_import_is_light_and_the_old_module_is_gone():
    code = ("import sys, launcher.train.preflight; assert 'torch' not in sys.modules, 'torch imported'\n"
            "try:\n    import launcher.preflight\nexcept ImportError:\n    pass\n"
            "else:\n    raise SystemExit('launcher.preflight still importable')")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# ---------------------------------------------------------------------------------------------------------------
# Two real processes (torchrun, gloo, CPU)

HELPER = textwrap.dedent("""
    import json, os, sys, time
    from datetime import timedelta
    import torch, torch.distributed as dist
    from launcher.config.schema import ClusterConfig
    from launcher.train.preflight import EXIT_PREFLIGHT, PreflightError, PreflightOptions, run_preflight

    args = json.loads(sys.argv[1])
    rank, local, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    if rank == args.get("absent_rank"):
        time.sleep(60)  # never reaches the preflight: the others' watchdog must end the job
    t0 = time.perf_counter()
    try:
        cluster = ClusterConfig(name="test", partition="x", **args["cluster"]) if args.get("cluster") else None
        options = PreflightOptions(run_dir=args.get("run_dir"), timeout_s=args.get("timeout_s", 60),
                                   require_device=args.get("require_device"))
        report = run_preflight(cluster, rank=rank, local_rank=local, world_size=world, device=torch.device("cpu"),
                               options=options)
        result, code = {"ok": True, "busbw": report.bandwidth["busbw_gbps"], "ranks": len(report.records),
                        "elapsed_s": time.perf_counter() - t0}, 0
    except PreflightError as e:
        print(f"train: [rank {rank}] {e}", file=sys.stderr, flush=True)
        result, code = {"ok": False, "message": str(e), "json": e.report.json_path}, EXIT_PREFLIGHT
    with open(os.path.join(args["out"], f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)
    dist.barrier()  # both ranks wrote their result before either exits (torchrun kills the rest on a failure)
    dist.destroy_process_group()
    sys.exit(code)
""")


def torchrun(tmp_path, args, timeout=60):
    script = tmp_path / "preflight_job.py"
    script.write_text(HELPER)
    env = {k: v for k, v in os.environ.items()
           if k not in R.VISIBLE_VARS and not k.startswith(("NCCL_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TORCHELASTIC_ERROR_FILE="")
    args = {"out": str(tmp_path), **args}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         json.dumps(args)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout,
    )


def results(tmp_path):
    return {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)
            if (tmp_path / f"rank{r}.json").exists()}


def test_two_ranks_pass_print_table_and_write_json(tmp_path):
    run_dir = tmp_path / "run"
    # The expectation comes from the profile (cluster.expected_busbw_gbps, a schema field).
    proc = torchrun(tmp_path, {"run_dir": str(run_dir), "cluster": {"device": "cpu", "backend": "gloo",
                                                                    "cpus_per_task": 1, "expected_busbw_gbps": 1000.0}})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = results(tmp_path)
    assert res[0]["ok"] and res[1]["ok"] and res[0]["busbw"] == res[1]["busbw"] > 0
    print(f"preflight on 2 CPU ranks: {res[0]['elapsed_s']:.3f}s / {res[1]['elapsed_s']:.3f}s, "
          f"busbw {res[0]['busbw']:.2f} GB/s")
    assert max(r["elapsed_s"] for r in res.values()) < 5
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("rank  local  host"))
    assert [lines[header + 1].split()[0], lines[header + 2].split()[0]] == ["0", "1"]  # one line per rank
    assert any(line.startswith("preflight: PASSED") for line in lines)
    assert sum("preflight: PASSED" in line for line in lines) == 1  # rank 0 only
    data = json.loads((run_dir / "preflight.json").read_text())
    assert data["ok"] is True and data["world_size"] == 2 and [r["rank"] for r in data["records"]] == [0, 1]
    assert data["bandwidth"]["busbw_gbps"] > 0 and data["backend"] == "gloo" and data["transport"] == "n/a"
    assert all(r["correct"] for r in data["records"]) and all(r["cpus"] for r in data["records"])
    # The measured bandwidth is far below 1000 GB/s: a warning, not a failure.
    assert any(f["check"] == "bandwidth" and f["level"] == "warn" for f in data["findings"])


def test_required_gpu_missing_stops_every_rank(tmp_path):
    run_dir = tmp_path / "run"
    start = time.perf_counter()
    proc = torchrun(tmp_path, {"run_dir": str(run_dir),
                               "cluster": {"device": "a100_64gb", "backend": "gloo", "cpus_per_task": 1}})
    assert proc.returncode != 0
    assert f"exitcode  : {EXIT_PREFLIGHT}" in proc.stderr  # torchrun's summary of the workers
    res = results(tmp_path)
    assert set(res) == {0, 1} and not res[0]["ok"] and not res[1]["ok"]
    assert res[0]["message"] == res[1]["message"]  # the same verdict on every rank
    msg = res[0]["message"]
    for rank in (0, 1):
        assert f"rank {rank} (host " in msg and f"local rank {rank}): no GPU visible" in msg
        assert f"train: [rank {rank}] preflight failed on 2 of 2 rank(s)" in proc.stderr
    assert "cluster.device=a100_64gb" in msg and "torch.cuda.device_count()=0" in msg
    data = json.loads((run_dir / "preflight.json").read_text())
    assert data["ok"] is False and data["bandwidth"] == {"skipped": "a device check failed"}
    assert "FAILED" in proc.stdout
    assert time.perf_counter() - start < 30


def test_rank_that_never_arrives_ends_the_job_after_timeout(tmp_path):
    proc = torchrun(tmp_path, {"absent_rank": 1, "timeout_s": 1.5})
    assert proc.returncode != 0
    assert "preflight: [rank 0 on" in proc.stderr and "timed out after 1.5s" in proc.stderr
    assert "all_gather_object of the records" in proc.stderr
    assert f"exitcode  : {EXIT_PREFLIGHT}" in proc.stderr
    assert not (tmp_path / "rank0.json").exists()


def test_single_process_without_process_group(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    report = P.run_preflight(None, rank=0, local_rank=0, world_size=1, device=torch.device("cpu"),
                             options=P.PreflightOptions(run_dir=tmp_path, timeout_s=30))
    assert report.ok and report.bandwidth["skipped"] == "single rank" and report.transport == "n/a"
    assert "preflight: PASSED" in capsys.readouterr().out
    assert json.loads((tmp_path / "preflight.json").read_text())["records"][0]["rank"] == 0
    with pytest.raises(P.PreflightError, match="not initialized"):
        P.run_preflight(None, rank=0, local_rank=0, world_size=2, device=torch.device("cpu"))


def test_broken_record_and_multi_backend_string():
    records = [rec(0, "h"), {"rank": 1, "local_rank": 1, "host": "h", "device": "cuda:1", "device_type": "cuda",
                             "record_error": "OSError: boom"}]
    fails = [f for f in check_records(records, world_size=2, require_device=False) if f.level == "fail"]
    assert fails[0].check == "record" and "rank 1 (host h, local rank 1): could not inspect itself" in fails[0].message
    two = [rec(0, "a", transport="socket"), rec(1, "b", transport="cxi")]
    assert check_transport(two, backend="cpu:gloo,cuda:nccl")[0] == "socket"
