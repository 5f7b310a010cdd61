"""The shmdirty perf harness: ops/sec of shmdirty against its baselines.

``python -m perf`` (or ``make bench``) runs every workload for every
implementation side by side in one run and reports ratios, never absolute
times.  One idea per module:

- ``registry``   names of implementations and workloads, the Impl interface,
                 and the decorators that register one small function per
                 (implementation, workload)
- ``workloads``  what each workload does and the inputs every worker builds
- ``harness``    spawn worker pools, barriers, timing, the hot-plug
                 coordinator, segment clean-up
- ``baselines``  ``lock`` and ``atomics-api``
- ``impl_shmdirty`` ``shmdirty-memb`` and ``shmdirty-qsbr`` over DirtyMemory
- ``cbaseline``  ``c``: ``cbench.c`` built with ``cc -O2`` at run time
- ``micro``      one atomic op (fast path / public API / lock) and RCU costs
- ``report``     the table, the issue-6 targets, the JSON document, the PNG plot
- ``machine``    platform, CPUs, load and versions, recorded with every run
"""
