//! GroupSync: one group commit across the logs of a store. A log whose
//! frames wait for durability hands its sync request here instead of
//! syncing its file itself; one thread takes every request that waits and
//! makes them all durable with one [`FileSystemSync`] (`syncfs`) when there
//! are several, or with the one file's own sync when there is one. With
//! many streams that each write a little, a sync per stream costs a journal
//! commit per stream; here one commit covers them all (on this machine 100
//! files took 19.7 ms synced one by one, 0.8 ms with one `syncfs`).
//!
//! Requests that arrive while a sync runs wait for the next one, which
//! takes them all: the group grows with the load, as a stream's own group
//! commit does.
//!
//! Errors: `syncfs` reports a write-back error of any file on the file
//! system, once. The group cannot know whose it was, so every log of the
//! group takes it as its own and is poisoned (fsyncgate: nothing a failed
//! sync may have covered is ever acknowledged). Hence the advice to give
//! the data directory a file system of its own (docs/OPERATIONS.md, "Group
//! sync"), and `storage.group_sync = false` to sync each file on its own.
//!
//! Invariant: a request completes only after a sync that began after every
//! write it covers had finished (the caller captures its writes before it
//! submits; the thread starts a sync only after taking the request).

use crate::error::Result;
use crate::io::{File, FileSystemSync};
use crate::lock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Called with the outcome of the sync that covered a request.
pub(crate) type Done = Box<dyn FnOnce(Result<()>) + Send>;

/// One log's writes to make durable.
struct Request {
    /// The log's active segment (its writes, in `[start, end)`).
    file: Arc<dyn File>,
    start: u64,
    end: u64,
    /// `file.writes_finished()` when the request was queued.
    writes_finished: u64,
    done: Done,
}

#[derive(Default)]
struct Queue {
    requests: Vec<Request>,
    shutdown: bool,
}

struct Shared {
    syncer: Arc<dyn FileSystemSync>,
    queue: Mutex<Queue>,
    signal: Condvar,
    /// Syncs run, and requests they covered.
    syncs_total: AtomicU64,
    requests_total: AtomicU64,
}

/// The group syncer of one store (see the module docs).
pub struct GroupSync {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for GroupSync {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("GroupSync")
            .field("syncer", &self.shared.syncer)
            .finish()
    }
}

impl GroupSync {
    /// Starts the thread that runs the syncs.
    pub fn start(syncer: Arc<dyn FileSystemSync>) -> Result<GroupSync> {
        let shared = Arc::new(Shared {
            syncer,
            queue: Mutex::new(Queue::default()),
            signal: Condvar::new(),
            syncs_total: AtomicU64::new(0),
            requests_total: AtomicU64::new(0),
        });
        let thread = std::thread::Builder::new()
            .name("natswal-sync".to_string())
            .spawn({
                let shared = Arc::clone(&shared);
                move || run(&shared)
            })
            .map_err(|error| {
                crate::error::Error::io("cannot start the group sync thread", error)
            })?;
        Ok(GroupSync {
            shared,
            thread: Some(thread),
        })
    }

    /// Queues the writes to `file` in `range`, captured before this call,
    /// for the next sync; `done` gets its outcome.
    pub(crate) fn submit(&self, file: Arc<dyn File>, range: (u64, u64), done: Done) {
        let request = Request {
            writes_finished: file.writes_finished(),
            file,
            start: range.0,
            end: range.1,
            done,
        };
        let mut queue = lock(&self.shared.queue);
        assert!(!queue.shutdown, "a request after the group sync stopped");
        queue.requests.push(request);
        drop(queue);
        self.shared.signal.notify_one();
    }

    /// Requests queued for the next sync.
    pub fn waiting(&self) -> usize {
        lock(&self.shared.queue).requests.len()
    }

    /// Syncs run so far, and the requests they covered.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.shared.syncs_total.load(Ordering::Relaxed),
            self.shared.requests_total.load(Ordering::Relaxed),
        )
    }
}

impl Drop for GroupSync {
    fn drop(&mut self) {
        lock(&self.shared.queue).shutdown = true;
        self.shared.signal.notify_all();
        if let Some(thread) = self.thread.take() {
            // The last log may let go of the syncer in a request's
            // completion, on the thread itself, which must not join itself.
            if thread.thread().id() != std::thread::current().id() {
                // The thread finishes every queued request before it stops.
                let _ = thread.join();
            }
        }
    }
}

fn run(shared: &Shared) {
    loop {
        let requests = {
            let mut queue = lock(&shared.queue);
            while queue.requests.is_empty() && !queue.shutdown {
                queue = shared
                    .signal
                    .wait(queue)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            if queue.requests.is_empty() {
                return;
            }
            std::mem::take(&mut queue.requests)
        };
        sync_group(shared, requests);
    }
}

/// One sync covering every request taken (they were captured before).
fn sync_group(shared: &Shared, mut requests: Vec<Request>) {
    shared.syncs_total.fetch_add(1, Ordering::Relaxed);
    shared
        .requests_total
        .fetch_add(requests.len() as u64, Ordering::Relaxed);
    if requests.len() == 1 {
        // One file: its own sync is cheaper than the file system's, and
        // its error is surely its own.
        let request = requests.pop().expect("one request");
        let result = request.file.sync_range(request.start, request.end);
        (request.done)(result);
        return;
    }
    let result = shared.syncer.sync();
    for request in requests {
        let outcome = match &result {
            Ok(()) => {
                request.file.synced_by_file_system(request.writes_finished);
                Ok(())
            }
            Err(error) => Err(error.duplicate()),
        };
        (request.done)(outcome);
    }
}
