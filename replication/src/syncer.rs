//! The one thread that syncs a replicated stream's log for openraft: flush
//! callbacks queue here and fire, in the order they came, only after a
//! sync that covers the frames appended before them (group commit: every
//! callback waiting when a sync starts shares it). The commit index is
//! saved here too, after the syncs, coalesced to the latest value.
//!
//! Invariant: a callback fires with `Ok` only if a sync that started after
//! its frames were written succeeded; a failed sync poisons the log and
//! every later callback fails.

use crate::types::StreamRaft;
use natswal::format::metadata::LogId as FrameLogId;
use natswal::{lock, Log};
use openraft::storage::IOFlushed;
use std::io;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

enum Job {
    Flush(IOFlushed<StreamRaft>),
    SaveCommitted,
}

pub struct Syncer {
    sender: Mutex<Option<mpsc::Sender<Job>>>,
    committed: Arc<Mutex<Option<FrameLogId>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Syncer {
    pub fn start(log: Arc<Log>) -> Syncer {
        let committed = Arc::new(Mutex::new(log.metadata().committed));
        let (sender, receiver) = mpsc::channel();
        let shared = Arc::clone(&committed);
        let thread = std::thread::Builder::new()
            .name(format!("raft-sync-{}", log.name()))
            .spawn(move || run(&log, &receiver, &shared))
            .expect("spawning a thread");
        Syncer {
            sender: Mutex::new(Some(sender)),
            committed,
            thread: Mutex::new(Some(thread)),
        }
    }

    /// Fires `callback` after the next sync.
    pub fn flush(&self, callback: IOFlushed<StreamRaft>) {
        if let Some(sender) = lock(&self.sender).as_ref() {
            if let Err(mpsc::SendError(Job::Flush(callback))) = sender.send(Job::Flush(callback)) {
                callback.io_completed(Err(io::Error::other("the log's syncer has stopped")));
            }
        }
    }

    /// Records the commit index; it reaches the metadata file after the
    /// syncs queued before it.
    pub fn save_committed(&self, committed: Option<FrameLogId>) {
        *lock(&self.committed) = committed;
        if let Some(sender) = lock(&self.sender).as_ref() {
            let _ = sender.send(Job::SaveCommitted);
        }
    }

    pub fn committed(&self) -> Option<FrameLogId> {
        *lock(&self.committed)
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        lock(&self.sender).take();
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }
}

fn run(log: &Log, receiver: &mpsc::Receiver<Job>, committed: &Mutex<Option<FrameLogId>>) {
    let mut saved = log.metadata().committed;
    while let Ok(first) = receiver.recv() {
        let mut callbacks = Vec::new();
        let mut save = false;
        for job in std::iter::once(first).chain(receiver.try_iter()) {
            match job {
                Job::Flush(callback) => callbacks.push(callback),
                Job::SaveCommitted => save = true,
            }
        }
        if !callbacks.is_empty() {
            match log.sync() {
                Ok(_) => callbacks
                    .into_iter()
                    .for_each(|callback| callback.io_completed(Ok(()))),
                Err(error) => {
                    let message = format!("stream '{}': sync failed: {error}", log.name());
                    tracing::error!("{message}");
                    for callback in callbacks {
                        callback.io_completed(Err(io::Error::other(message.clone())));
                    }
                }
            }
        }
        let latest = *lock(committed);
        if save && latest != saved && !log.is_poisoned() {
            match log.save_committed(latest) {
                Ok(()) => saved = latest,
                Err(error) => tracing::warn!(
                    "stream '{}': saving the commit index failed: {error}",
                    log.name()
                ),
            }
        }
    }
}
