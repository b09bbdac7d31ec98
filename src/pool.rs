//! IoPool: a fixed set of threads that runs the write and sync work of
//! every stream that uses it, so that a stream costs no thread of its own
//! and an idle one costs nothing at all.
//!
//! Each job (a stream) has [`LANES`] lanes: its write steps, and its sync
//! steps. A lane is queued at most once and run by at most one thread at a
//! time, so a stream's writes stay in order and its group commit stays one
//! sync at a time, exactly as with dedicated threads; the two lanes of one
//! stream run in parallel, so writing the next frames overlaps the sync of
//! the previous ones. A lane that did work goes to the back of the queue
//! (round robin: a busy stream takes one step per turn, so it cannot starve
//! a quiet one). A lane is queued when there is work for it (an append,
//! frames to sync, space freed by a sync) or when one of its timers falls
//! due (maintenance, an interval sync); a job holds at most one timer per
//! lane.
//!
//! Lane states move IDLE -> QUEUED (scheduled) -> RUNNING -> IDLE, or
//! RUNNING -> AGAIN (work arrived while running) -> QUEUED after the run:
//! a wake-up that arrives mid-run is never lost.
//!
//! Sizing and placement are in docs/OPERATIONS.md ("I/O threads"). The pool
//! does not pin its threads: the machines this is measured on have one
//! NUMA node; on several, one pool per node, each serving the streams whose
//! disks hang off it, with its threads pinned to the node, is the layout.

use crate::lock;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

/// Lanes per job: [`Lane::Write`] and [`Lane::Sync`].
pub const LANES: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Lane {
    Write = 0,
    Sync = 1,
}

const IDLE: u8 = 0;
const QUEUED: u8 = 1;
const RUNNING: u8 = 2;
const AGAIN: u8 = 3;

/// What one run of a lane asks for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Outcome {
    /// It did work and may have more: queue it again (at the back).
    pub again: bool,
    /// Run it no later than this (if nothing wakes it before).
    pub timer: Option<Instant>,
}

/// Work the pool runs: one stream.
pub trait Job: Send + Sync {
    /// One turn of `lane`: a bounded amount of work.
    fn run(&self, lane: Lane) -> Outcome;
    /// The job's lane states (owned by the job, driven by the pool).
    fn lanes(&self) -> &LaneStates;
}

/// The scheduling state of a job's lanes.
#[derive(Debug, Default)]
pub struct LaneStates {
    states: [AtomicU8; LANES],
    /// The deadline of each lane's pending timer, if any (one per lane).
    timers: [Mutex<Option<Instant>>; LANES],
}

struct Timer {
    deadline: Instant,
    sequence: u64,
    job: Weak<dyn Job>,
    lane: Lane,
}

impl PartialEq for Timer {
    fn eq(&self, other: &Self) -> bool {
        (self.deadline, self.sequence) == (other.deadline, other.sequence)
    }
}
impl Eq for Timer {}
impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Timer {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.deadline, self.sequence).cmp(&(other.deadline, other.sequence))
    }
}

#[derive(Default)]
struct State {
    queue: VecDeque<(Arc<dyn Job>, Lane)>,
    timers: BinaryHeap<Reverse<Timer>>,
    timer_sequence: u64,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    signal: Condvar,
}

/// A handle for waking one job's lanes (what the job keeps).
#[derive(Clone)]
pub struct Waker {
    shared: Arc<Shared>,
    job: Weak<dyn Job>,
}

impl std::fmt::Debug for Waker {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Waker")
    }
}

impl Waker {
    /// Queues `lane` unless it is queued already (or notes, if it is
    /// running, that it must run once more).
    pub fn wake(&self, lane: Lane) {
        if let Some(job) = self.job.upgrade() {
            schedule(&self.shared, &job, lane);
        }
    }
}

/// The pool. Dropping it stops its threads once the queue is empty.
pub struct IoPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for IoPool {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("IoPool")
            .field("threads", &self.threads.len())
            .finish()
    }
}

/// The default number of I/O threads: two per core (a thread blocked in a
/// sync leaves the core to another), at least 2 and at most 64.
pub fn default_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |cores| cores.get());
    (cores * 2).clamp(2, 64)
}

impl IoPool {
    /// Starts `threads` threads (at least 1) named `<name>-<n>`.
    pub fn new(name: &str, threads: usize) -> crate::error::Result<Arc<IoPool>> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            signal: Condvar::new(),
        });
        let mut handles = Vec::new();
        for number in 0..threads.max(1) {
            let worker_shared = Arc::clone(&shared);
            let handle = std::thread::Builder::new()
                .name(format!("{name}-{number}"))
                .spawn(move || work(&worker_shared))
                .map_err(|error| crate::error::Error::io("cannot start an I/O thread", error))?;
            handles.push(handle);
        }
        Ok(Arc::new(IoPool {
            shared,
            threads: handles,
        }))
    }

    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// A waker for `job`, which the pool then serves.
    pub fn waker(&self, job: &Arc<dyn Job>) -> Waker {
        Waker {
            shared: Arc::clone(&self.shared),
            job: Arc::downgrade(job),
        }
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        lock(&self.shared.state).shutdown = true;
        self.shared.signal.notify_all();
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

fn schedule(shared: &Shared, job: &Arc<dyn Job>, lane: Lane) {
    let state = &job.lanes().states[lane as usize];
    let mut current = state.load(Ordering::Acquire);
    loop {
        let next = match current {
            IDLE => QUEUED,
            RUNNING => AGAIN,
            _ => return,
        };
        match state.compare_exchange(current, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) if next == QUEUED => break,
            Ok(_) => return,
            Err(actual) => current = actual,
        }
    }
    lock(&shared.state).queue.push_back((Arc::clone(job), lane));
    shared.signal.notify_one();
}

/// Arms `lane`'s timer for `deadline` unless an earlier one is armed.
fn arm(state: &mut State, job: &Arc<dyn Job>, lane: Lane, deadline: Instant) {
    let mut armed = lock(&job.lanes().timers[lane as usize]);
    if armed.is_some_and(|current| current <= deadline) {
        return;
    }
    *armed = Some(deadline);
    state.timer_sequence += 1;
    state.timers.push(Reverse(Timer {
        deadline,
        sequence: state.timer_sequence,
        job: Arc::downgrade(job),
        lane,
    }));
}

/// Moves the timers that fell due to the queue; returns the next deadline.
fn fire_timers(state: &mut State, now: Instant) -> Option<Instant> {
    let mut due = Vec::new();
    while let Some(Reverse(timer)) = state.timers.peek() {
        if timer.deadline > now {
            break;
        }
        let Reverse(timer) = state.timers.pop().expect("peeked");
        let Some(job) = timer.job.upgrade() else {
            continue;
        };
        let mut armed = lock(&job.lanes().timers[timer.lane as usize]);
        // A later (replaced) or cleared timer: another entry is current.
        if *armed != Some(timer.deadline) {
            continue;
        }
        *armed = None;
        drop(armed);
        due.push((job, timer.lane));
    }
    for (job, lane) in due {
        let lane_state = &job.lanes().states[lane as usize];
        if lane_state
            .compare_exchange(IDLE, QUEUED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            state.queue.push_back((job, lane));
        } else {
            let _ =
                lane_state.compare_exchange(RUNNING, AGAIN, Ordering::AcqRel, Ordering::Acquire);
        }
    }
    state.timers.peek().map(|Reverse(timer)| timer.deadline)
}

fn work(shared: &Shared) {
    loop {
        let (job, lane) = {
            let mut state = lock(&shared.state);
            loop {
                let next_deadline = fire_timers(&mut state, Instant::now());
                if let Some(task) = state.queue.pop_front() {
                    break task;
                }
                if state.shutdown {
                    return;
                }
                state = match next_deadline {
                    Some(deadline) => {
                        let wait = deadline.saturating_duration_since(Instant::now());
                        shared
                            .signal
                            .wait_timeout(state, wait)
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .0
                    }
                    None => shared
                        .signal
                        .wait(state)
                        .unwrap_or_else(|poisoned| poisoned.into_inner()),
                };
            }
        };
        let lane_state = &job.lanes().states[lane as usize];
        lane_state.store(RUNNING, Ordering::Release);
        // A panic is a bug in the job; the thread survives it (it serves
        // every other stream) and the lane is retried later.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run(lane)))
            .unwrap_or_else(|_| {
                tracing::error!(?lane, "an I/O job panicked; retrying it in a second");
                Outcome {
                    again: false,
                    timer: Some(Instant::now() + std::time::Duration::from_secs(1)),
                }
            });
        let requeue = outcome.again
            || lane_state
                .compare_exchange(RUNNING, IDLE, Ordering::AcqRel, Ordering::Acquire)
                .is_err();
        let mut state = lock(&shared.state);
        if let Some(deadline) = outcome.timer {
            arm(&mut state, &job, lane, deadline);
        }
        if requeue {
            lane_state.store(QUEUED, Ordering::Release);
            state.queue.push_back((job, lane));
            drop(state);
            shared.signal.notify_one();
        } else if outcome.timer.is_some() {
            // Another thread may be waiting for a later deadline.
            drop(state);
            shared.signal.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    /// Counts its runs; does `work` turns of work on the write lane.
    struct Counter {
        lanes: LaneStates,
        runs: AtomicU64,
        work: AtomicU64,
        running: AtomicU8,
        overlapped: AtomicU64,
        timer: Mutex<Option<Instant>>,
        /// Runs of every counter sharing it, in order; `ticked` holds its
        /// value at this counter's last run.
        clock: Arc<AtomicU64>,
        ticked: AtomicU64,
    }

    impl Counter {
        fn new(work: u64) -> Arc<Counter> {
            Counter::with_clock(work, Arc::new(AtomicU64::new(0)))
        }

        fn with_clock(work: u64, clock: Arc<AtomicU64>) -> Arc<Counter> {
            Arc::new(Counter {
                lanes: LaneStates::default(),
                runs: AtomicU64::new(0),
                work: AtomicU64::new(work),
                running: AtomicU8::new(0),
                overlapped: AtomicU64::new(0),
                timer: Mutex::new(None),
                clock,
                ticked: AtomicU64::new(0),
            })
        }
    }

    impl Job for Counter {
        fn run(&self, _lane: Lane) -> Outcome {
            if self.running.fetch_add(1, Ordering::SeqCst) != 0 {
                self.overlapped.fetch_add(1, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_micros(50));
            self.runs.fetch_add(1, Ordering::SeqCst);
            let tick = self.clock.fetch_add(1, Ordering::SeqCst) + 1;
            self.ticked.store(tick, Ordering::SeqCst);
            let left = self.work.load(Ordering::SeqCst);
            if left > 0 {
                self.work.store(left - 1, Ordering::SeqCst);
            }
            self.running.fetch_sub(1, Ordering::SeqCst);
            Outcome {
                again: left > 1,
                timer: lock(&self.timer).take(),
            }
        }

        fn lanes(&self) -> &LaneStates {
            &self.lanes
        }
    }

    fn wait_until(condition: impl Fn() -> bool) {
        let started = Instant::now();
        while !condition() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "condition not met in 10 s"
            );
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_lane_runs_on_one_thread_at_a_time_and_no_wake_is_lost() {
        let pool = IoPool::new("test-pool", 4).unwrap();
        let counter = Counter::new(0);
        let job: Arc<dyn Job> = counter.clone();
        let waker = pool.waker(&job);
        for round in 1..=2000u64 {
            counter.work.fetch_add(1, Ordering::SeqCst);
            waker.wake(Lane::Write);
            if round % 100 == 0 {
                wait_until(|| counter.work.load(Ordering::SeqCst) == 0);
            }
        }
        wait_until(|| counter.work.load(Ordering::SeqCst) == 0);
        assert_eq!(counter.overlapped.load(Ordering::SeqCst), 0);
        assert!(counter.runs.load(Ordering::SeqCst) >= 20);
    }

    #[test]
    fn a_busy_job_does_not_starve_a_quiet_one() {
        let pool = IoPool::new("test-pool", 1).unwrap();
        let clock = Arc::new(AtomicU64::new(0));
        let busy = Counter::with_clock(1_000_000, Arc::clone(&clock));
        let quiet = Counter::with_clock(1, Arc::clone(&clock));
        let busy_job: Arc<dyn Job> = busy.clone();
        let quiet_job: Arc<dyn Job> = quiet.clone();
        pool.waker(&busy_job).wake(Lane::Write);
        wait_until(|| busy.runs.load(Ordering::SeqCst) > 10);
        // One thread, round robin: the quiet job runs after at most one
        // more turn of the busy one. The clock counts the turns between
        // the wake and the quiet run itself, not those the busy job takes
        // while this thread polls (the old count, flaky under load).
        let before_wake = clock.load(Ordering::SeqCst);
        pool.waker(&quiet_job).wake(Lane::Write);
        wait_until(|| quiet.runs.load(Ordering::SeqCst) == 1);
        let busy_turns = quiet.ticked.load(Ordering::SeqCst) - before_wake - 1;
        assert!(
            busy_turns <= 2,
            "{busy_turns} busy turns before the quiet one"
        );
        busy.work.store(0, Ordering::SeqCst);
    }

    #[test]
    fn a_timer_runs_an_idle_lane() {
        let pool = IoPool::new("test-pool", 2).unwrap();
        let counter = Counter::new(1);
        *lock(&counter.timer) = Some(Instant::now() + Duration::from_millis(20));
        let job: Arc<dyn Job> = counter.clone();
        pool.waker(&job).wake(Lane::Write);
        wait_until(|| counter.runs.load(Ordering::SeqCst) == 2);
        assert!(lock(&counter.lanes.timers[0]).is_none());
    }
}
