"""CPU kernels for the CC side of the partition: unit slices computed on the CPU.

    from engine.cpu_kernels import SliceJob, run_slice_jobs, kernel_info
    run_slice_jobs([SliceJob(x, gate_up, down, out), ...])   # all CC jobs of one layer at once

One fused pass per job (gate/up rows -> bf16 intermediate in cache -> down rows), fp32
accumulation, weights read in place (no copy, no repacking). Paths: AMX (large token blocks),
AVX512-BF16, AVX2+FMA, and a torch fallback. See docs/CPU_KERNELS.md.
"""

from engine.cpu_kernels.runner import (
    available_paths,
    job_path,
    kernel_info,
    prepare_slice_jobs,
    run_slice_jobs,
    set_num_threads,
    start_slice_jobs,
)
from engine.cpu_kernels.slice_job import SliceJob

__all__ = ["SliceJob", "available_paths", "job_path", "kernel_info", "prepare_slice_jobs", "run_slice_jobs", "set_num_threads",
           "start_slice_jobs"]
