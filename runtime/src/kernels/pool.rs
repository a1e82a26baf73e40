//! A small persistent thread pool for the per-token matrix-vector products.
//!
//! Decoding one token runs a few hundred short parallel loops (one per
//! weight matrix, ~10–50 µs each). A general work-stealing pool pays for
//! waking sleeping workers and queues jobs on the heap; this pool keeps its
//! workers spinning on an epoch counter for a short while after each job
//! (yielding the core now and then, then parking on a condition variable),
//! hands every worker the same borrowed closure, and joins on atomic
//! counters: no allocation and no thread spawn per call. `nibble bench
//! --pool rayon|spin` measures it against rayon.
//!
//! A job is cut into one part per thread, and thread `i` takes part `i`
//! first, so on an idle machine every thread runs its own static part. But
//! any thread that finishes takes the parts nobody has claimed yet: when a
//! worker is descheduled (another program on the core, more threads than
//! cores), the caller does its part instead of spinning until the scheduler
//! brings the worker back, and it waits only for parts that running threads
//! hold, never for a worker that has not woken up.
//!
//! The one `unsafe` here erases the closure's lifetime to publish it to the
//! workers; a worker enters a job (`active`) before it reads the pointer,
//! and [`SpinPool::run`] closes the job and waits until no worker is inside
//! before it returns, which is what makes that sound.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Spins (each a `spin_loop` hint) before a waiting worker parks; between
/// the jobs of one token the next comes within microseconds.
const SPIN_ROUNDS: usize = 1 << 14;

/// Spins between two `yield_now` calls of a waiting thread: a descheduled
/// thread of ours (or a neighbour's) gets the core back within a few
/// microseconds instead of a scheduler tick.
const SPINS_PER_YIELD: usize = 256;

/// A job: called once per thread with `(thread index, thread count)`.
type Job<'a> = &'a (dyn Fn(usize, usize) + Sync);

/// Keeps a hot atomic on its own cache line (spinning readers of one must
/// not be disturbed by writes to another).
#[repr(align(128))]
struct Padded<T>(T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

struct Shared {
    /// Bumped to publish a job.
    epoch: Padded<AtomicUsize>,
    /// Parts of the current job finished.
    parts_done: Padded<AtomicUsize>,
    /// Part `i` of the current job has been taken.
    claimed: Vec<AtomicBool>,
    /// Workers inside the current job (they may read `job`).
    active: Padded<AtomicUsize>,
    /// The current job takes no new workers.
    closed: AtomicBool,
    /// Points at a `Job` on the caller's stack while a job runs.
    job: AtomicPtr<Job<'static>>,
    /// A worker's job panicked.
    panicked: AtomicBool,
    stop: AtomicBool,
    /// Workers parked (or about to park) on `wake`.
    parked: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

/// A pool of `n_threads − 1` workers plus the calling thread.
pub struct SpinPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    n_threads: usize,
}

impl SpinPool {
    /// A pool running jobs on `n_threads` threads (the caller included).
    pub fn new(n_threads: usize) -> std::io::Result<SpinPool> {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            epoch: Padded(AtomicUsize::new(0)),
            parts_done: Padded(AtomicUsize::new(0)),
            claimed: (0..n_threads).map(|_| AtomicBool::new(true)).collect(),
            active: Padded(AtomicUsize::new(0)),
            closed: AtomicBool::new(true),
            job: AtomicPtr::new(std::ptr::null_mut()),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            parked: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut workers = Vec::with_capacity(n_threads - 1);
        for idx in 1..n_threads {
            let sh = shared.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("nibble-worker-{idx}"))
                    .spawn(move || worker(&sh, idx, n_threads))?,
            );
        }
        Ok(SpinPool {
            shared,
            workers,
            n_threads,
        })
    }

    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Run `f(i, n)` for every part `i < n` (n = the pool's threads) and
    /// return when all are done; part `i` runs on thread `i` unless that
    /// thread is late, then on whichever thread gets to it first. A panic in
    /// any part is re-raised here.
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        if self.n_threads == 1 {
            return f(0, 1);
        }
        let sh = &*self.shared;
        let job: Job<'_> = f;
        let job_ptr = &job as *const Job<'_> as *mut Job<'static>;
        sh.job.store(job_ptr, Ordering::SeqCst);
        sh.parts_done.store(0, Ordering::SeqCst);
        for c in &sh.claimed {
            c.store(false, Ordering::SeqCst);
        }
        sh.closed.store(false, Ordering::SeqCst);
        sh.epoch.fetch_add(1, Ordering::SeqCst);
        if sh.parked.load(Ordering::SeqCst) > 0 {
            let _guard = sh.lock.lock().unwrap_or_else(|e| e.into_inner());
            sh.wake.notify_all();
        }
        let mine = run_parts(sh, f, 0, self.n_threads);
        wait_until(|| sh.parts_done.load(Ordering::Acquire) >= self.n_threads);
        // No worker enters from now on; wait for those inside to leave.
        sh.closed.store(true, Ordering::SeqCst);
        wait_until(|| sh.active.load(Ordering::SeqCst) == 0);
        sh.job.store(std::ptr::null_mut(), Ordering::SeqCst);
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if sh.panicked.swap(false, Ordering::SeqCst) {
            panic!("a nibble worker thread panicked");
        }
    }
}

/// Spin on `done`, yielding the core every [`SPINS_PER_YIELD`] spins.
fn wait_until(done: impl Fn() -> bool) {
    let mut spins = 0usize;
    while !done() {
        spins += 1;
        if spins.is_multiple_of(SPINS_PER_YIELD) {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Run part `first` if nobody has taken it, then every part still free.
/// A panicking part counts as done (the panic is reported) so that the
/// caller never waits for it.
fn run_parts(sh: &Shared, f: Job<'_>, first: usize, n: usize) -> std::thread::Result<()> {
    let mut result = Ok(());
    for i in (first..n).chain(0..first) {
        if sh.claimed[i].swap(true, Ordering::AcqRel) {
            continue;
        }
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(i, n))) {
            result = Err(p);
        }
        sh.parts_done.fetch_add(1, Ordering::Release);
    }
    result
}

/// A raw pointer that may cross threads (the disjoint-chunk split below).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);

impl SendPtr {
    /// Through a method, so closures capture the whole (Sync) wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: only used by `split_mut`, which hands every thread disjoint
// ranges of one slice that is mutably borrowed for the whole call.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SpinPool {
    /// Split `out` into one contiguous part per thread (thread `i` of `t`
    /// gets `out[n·i/t .. n·(i+1)/t]`) and run `f(start, part)` on each.
    /// Static parts measured faster than handing out chunks through an
    /// atomic counter (188 vs 148 tok/s on SmolLM2 at 2 threads, separate runs).
    pub fn split_mut(&self, out: &mut [f32], f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
        let n = out.len();
        let base = SendPtr(out.as_mut_ptr());
        self.run(&|i, t| {
            let (lo, hi) = (n * i / t, n * (i + 1) / t);
            if lo < hi {
                // SAFETY: the parts of different threads are disjoint and
                // inside `out` (lo ≤ hi ≤ n), and `out` stays mutably borrowed
                // until `run` returns, after every thread has finished.
                let part = unsafe { std::slice::from_raw_parts_mut(base.get().add(lo), hi - lo) };
                f(lo, part);
            }
        });
    }
}

fn worker(sh: &Shared, idx: usize, n_threads: usize) {
    let mut seen = 0usize;
    loop {
        let mut spins = 0usize;
        loop {
            let e = sh.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            if sh.stop.load(Ordering::Acquire) {
                return;
            }
            if spins < SPIN_ROUNDS {
                spins += 1;
                if spins.is_multiple_of(SPINS_PER_YIELD) {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            } else {
                // Register as parked *before* re-checking the epoch, so that a
                // publisher either sees `parked > 0` or we see its new epoch.
                let guard = sh.lock.lock().unwrap_or_else(|e| e.into_inner());
                sh.parked.fetch_add(1, Ordering::SeqCst);
                let guard =
                    if sh.epoch.load(Ordering::SeqCst) == seen && !sh.stop.load(Ordering::SeqCst) {
                        sh.wake.wait(guard).unwrap_or_else(|e| e.into_inner())
                    } else {
                        guard
                    };
                sh.parked.fetch_sub(1, Ordering::SeqCst);
                drop(guard);
                spins = 0;
            }
        }
        // Enter the job, then check that it still takes workers: the caller
        // closes it before waiting for `active` to drain, so once it has
        // closed, no worker reads the pointer.
        sh.active.fetch_add(1, Ordering::SeqCst);
        if !sh.closed.load(Ordering::SeqCst) && sh.epoch.load(Ordering::SeqCst) == seen {
            let ptr = sh.job.load(Ordering::SeqCst);
            if !ptr.is_null() {
                // SAFETY: `run` stored a pointer to a live `Job` on its stack
                // before bumping the epoch we just observed, and the job is
                // not closed: `run` does not return (so the job outlives this
                // use) until `active` drops back to zero, after this call.
                let job: Job<'_> = unsafe { *ptr };
                if run_parts(sh, job, idx, n_threads).is_err() {
                    sh.panicked.store(true, Ordering::SeqCst);
                }
            }
        }
        sh.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for SpinPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _guard = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_runs_once_per_job_and_parts_cover_exactly() {
        for n in [1usize, 2, 3] {
            let pool = SpinPool::new(n).unwrap();
            for round in 0..200 {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.run(&|i, t| {
                    assert_eq!(t, n);
                    hits[i].fetch_add(1, Ordering::SeqCst);
                });
                assert!(
                    hits.iter().all(|h| h.load(Ordering::SeqCst) == 1),
                    "round {round}"
                );
                let mut out = vec![0f32; round % 37];
                pool.split_mut(&mut out, &|lo, part| {
                    for (i, v) in part.iter_mut().enumerate() {
                        *v += (lo + i) as f32 + 1.0;
                    }
                });
                assert!(out.iter().enumerate().all(|(i, &v)| v == i as f32 + 1.0));
            }
        }
    }

    #[test]
    fn parked_workers_wake_up() {
        let pool = SpinPool::new(2).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300)); // let it park
        let count = AtomicUsize::new(0);
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_worker_panic_reaches_the_caller_and_the_pool_survives() {
        let pool = SpinPool::new(2).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(&|i, _| {
                if i == 1 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }
}
