"""The preflight inside the allocation: every rank reports, rank 0 checks, all ranks stop together on failure.

Called once by every rank after ``init_process_group`` and before the model is built (``launcher.train.setup``)::

    from launcher.train.preflight import PreflightOptions, run_preflight

    report = run_preflight(cfg.cluster, model=cfg.model, rank=env.rank, local_rank=env.local_rank,
                           world_size=env.world_size, device=env.device, options=PreflightOptions(run_dir=run_dir))

Modules, one job each: ``records`` (what a rank reports about itself), ``checks`` (pure checks on the records),
``transport`` (the NCCL/RCCL transport from the debug log, and the socket-fallback check), ``report`` (findings,
table, message, ``preflight.json``), ``run`` (the watchdog, the all-reduce and the phases). docs/preflight.md has
sample output and what to do about each finding. Import is stdlib only (torch is imported inside the functions).
"""

from launcher.rundir import EXIT_PREFLIGHT
from launcher.train.preflight.checks import (
    bandwidth_summary, check_allreduce, check_bandwidth, check_cpu_binding, check_devices, check_gpu_sharing,
    check_numa, check_records,
)
from launcher.train.preflight.records import collect_record, format_ints, parse_ints, relevant_env
from launcher.train.preflight.report import (
    Finding, PreflightError, PreflightReport, decide, format_failure, format_table, write_json,
)
from launcher.train.preflight.run import PreflightOptions, measure_allreduce, run_preflight
from launcher.train.preflight.transport import (
    check_transport, detect_transport, expand_nccl_debug_file, fallback_cause, transport_evidence,
)

__all__ = [
    "EXIT_PREFLIGHT", "Finding", "PreflightError", "PreflightOptions", "PreflightReport", "bandwidth_summary",
    "check_allreduce", "check_bandwidth", "check_cpu_binding", "check_devices", "check_gpu_sharing", "check_numa",
    "check_records", "check_transport", "collect_record", "decide", "detect_transport", "expand_nccl_debug_file",
    "fallback_cause", "format_failure", "format_ints", "format_table", "measure_allreduce", "parse_ints",
    "relevant_env", "run_preflight", "transport_evidence", "write_json",
]
