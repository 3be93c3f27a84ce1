// The pause between two polls of a busy-wait: the CPU's spin-wait hint, never sched_yield.
// Under EEVDF (Linux 6.6 and later) a yield puts the thread's deadline a slice later whenever
// another task is runnable on its CPU, so a yielding poller waits milliseconds for its CPU at
// every poll. With two busy processes beside it on 2 cores, a tiny-code-moe decode step took
// 50 ms instead of under 1 (thread pool hand-offs), and the two-rank demo 5-6 s instead of 1.6-2
// (MPI waits). Pollers pause for a bounded window, then sleep; a woken sleeper runs ahead of busy
// processes.
#pragma once

namespace ef {

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

}  // namespace ef
