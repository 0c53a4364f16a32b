"""Process memory on CPU: keeping freed memory in the process (glibc), and reading the resident set size."""
import ctypes
import os
import resource
import sys

__all__ = ['retain_freed_memory', 'map_every_block', 'reset_peak_rss', 'peak_rss_kib', 'current_rss_kib']



def _mallopt():
    """glibc's mallopt, or None where there is none (other platforms and C libraries)."""
    if not sys.platform.startswith('linux'):
        return None
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None

def retain_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory in the process: no mmap for large blocks
    (M_MMAP_MAX = 0) and no trimming of the heap below 2 GiB free (M_TRIM_THRESHOLD).

    With glibc's defaults a training step on CPU unmaps its large activations and gradients when it
    frees them and page-faults them back on the next step: the kernel zeroes those pages again, which can
    cost as much system time as the step's compute, varying from run to run with the allocator's state.
    Returns False where there is no glibc mallopt (other platforms): timings then include that cost.
    """
    mallopt = _mallopt()
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return mallopt is not None and mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, 2 ** 31 - 1) == 1


def map_every_block(threshold: int = 2 ** 16) -> bool:
    """For measuring peak memory: glibc's malloc serves every block above `threshold` bytes with a mapping of its
    own (M_MMAP_THRESHOLD, fixed) and returns it to the system when freed, so that the peak resident set follows
    the live tensors, not where freed blocks happen to lie in the heap (which scatters the peak of one training
    step from run to run by tens of MB). Returns False where there is no glibc mallopt."""
    mallopt = _mallopt()
    m_mmap_threshold = -3  # from glibc's malloc.h
    return mallopt is not None and mallopt(m_mmap_threshold, threshold) == 1


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux >= 4.0), so that importing torch does not set the peak."""
    try:
        with open('/proc/self/clear_refs', 'w') as fh:
            fh.write('5')
        return peak_rss_kib() > 0
    except OSError:
        return False


def peak_rss_kib() -> int:
    with open('/proc/self/status') as fh:
        for line in fh:
            if line.startswith('VmHWM:'):
                return int(line.split()[1])
    return 0


def current_rss_kib() -> int:
    """Resident set size now (not the peak so far, which the imports may have set)."""
    try:
        with open('/proc/self/statm') as fh:
            return int(fh.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') // 1024
    except OSError:  # no procfs: fall back to the peak so far
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
