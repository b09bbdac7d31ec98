//! HandleLimit: a [`FileSystem`] around another that bounds the file
//! descriptors all streams of a store hold, of every kind (active segments
//! included), by closing the least recently used *clean* ones and reopening
//! them by path on their next use. An idle stream then holds no descriptor
//! at all; a store of 10 000 streams needs no more than the limit.
//!
//! Invariant: a handle is closed only while it is clean: every write,
//! allocation and length change made through it finished before a
//! successful sync of the whole file began, and none is in progress. So a
//! closed descriptor can never take a write-back error with it (fsyncgate):
//! whatever the kernel could still fail to write was synced through this
//! handle. A handle whose file syncs only ranges (`msync` in mmap mode, the
//! in-memory backend) becomes clean only through `sync_all`. Dirty handles
//! stay open, so the limit can be exceeded by the number of files with
//! unsynced writes (streams between a write and its sync).
//!
//! Writers bump `writes_started` under the handle's lock, the same lock the
//! closing takes, so a handle is never closed under a write that has begun.

use super::{DirectoryLock, File, FileSystem};
use crate::error::Result;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// Default bound on open data files across a store.
pub const OPEN_FILES_MAX_DEFAULT: usize = 512;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Budget {
    open_max: usize,
    tick: AtomicU64,
    /// Handles that may be open (closed ones leave at the next pass).
    open: Mutex<Vec<Weak<LimitedFile>>>,
    closed_total: AtomicU64,
    reopened_total: AtomicU64,
}

impl Budget {
    /// Records that `file` opened its descriptor and closes the least
    /// recently used clean others beyond the limit.
    fn opened(&self, file: &Arc<LimitedFile>) {
        let (candidates, mut excess) = {
            let mut open = lock(&self.open);
            open.retain(|entry| entry.upgrade().is_some_and(|live| live.is_open()));
            open.push(Arc::downgrade(file));
            if open.len() <= self.open_max {
                return;
            }
            let mut live: Vec<Arc<LimitedFile>> = open
                .iter()
                .filter_map(Weak::upgrade)
                .filter(|live| !Arc::ptr_eq(live, file))
                .collect();
            live.sort_by_key(|live| live.last_used.load(Ordering::Relaxed));
            (live, open.len() - self.open_max)
        };
        // Closing takes each file's own lock: never while holding ours.
        for candidate in candidates {
            if excess == 0 {
                break;
            }
            if candidate.close_if_clean() {
                self.closed_total.fetch_add(1, Ordering::Relaxed);
                excess -= 1;
            }
        }
    }
}

/// A file system whose data files hold at most `open_max` descriptors
/// (see the module documentation).
pub struct HandleLimit {
    inner: Arc<dyn FileSystem>,
    budget: Arc<Budget>,
}

impl std::fmt::Debug for HandleLimit {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("HandleLimit")
            .field("inner", &self.inner)
            .field("open_max", &self.budget.open_max)
            .finish()
    }
}

impl HandleLimit {
    pub fn new(inner: Arc<dyn FileSystem>, open_max: usize) -> HandleLimit {
        HandleLimit {
            inner,
            budget: Arc::new(Budget {
                open_max: open_max.max(1),
                tick: AtomicU64::new(1),
                open: Mutex::new(Vec::new()),
                closed_total: AtomicU64::new(0),
                reopened_total: AtomicU64::new(0),
            }),
        }
    }

    /// The file system it limits.
    pub fn inner(&self) -> &Arc<dyn FileSystem> {
        &self.inner
    }

    /// Data files with an open descriptor right now.
    pub fn open_count(&self) -> usize {
        lock(&self.budget.open)
            .iter()
            .filter(|entry| entry.upgrade().is_some_and(|live| live.is_open()))
            .count()
    }

    pub fn open_max(&self) -> usize {
        self.budget.open_max
    }

    /// Descriptors closed to stay within the limit, and reopened on demand.
    pub fn closed_and_reopened_total(&self) -> (u64, u64) {
        (
            self.budget.closed_total.load(Ordering::Relaxed),
            self.budget.reopened_total.load(Ordering::Relaxed),
        )
    }

    fn wrap(&self, path: &Path, writable: bool, file: Arc<dyn File>) -> Arc<dyn File> {
        let limited = Arc::new_cyclic(|me| LimitedFile {
            file_system: Arc::clone(&self.inner),
            path: path.to_path_buf(),
            writable,
            budget: Arc::clone(&self.budget),
            me: me.clone(),
            handle: Mutex::new(Some(file)),
            last_used: AtomicU64::new(0),
            writes_started: AtomicU64::new(0),
            writes_finished: AtomicU64::new(0),
            synced_writes: AtomicU64::new(0),
        });
        limited.touch();
        self.budget.opened(&limited);
        limited
    }
}

impl FileSystem for HandleLimit {
    fn create(&self, path: &Path) -> Result<Arc<dyn File>> {
        let file = self.inner.create(path)?;
        Ok(self.wrap(path, true, file))
    }

    fn open(&self, path: &Path, writable: bool) -> Result<Arc<dyn File>> {
        let file = self.inner.open(path, writable)?;
        Ok(self.wrap(path, writable, file))
    }

    fn read(&self, path: &Path) -> Result<Vec<u8>> {
        self.inner.read(path)
    }

    fn remove(&self, path: &Path) -> Result<()> {
        self.inner.remove(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        self.inner.rename(from, to)
    }

    fn list(&self, directory: &Path) -> Result<Vec<String>> {
        self.inner.list(directory)
    }

    fn make_directory(&self, path: &Path) -> Result<()> {
        self.inner.make_directory(path)
    }

    fn is_directory(&self, path: &Path) -> bool {
        self.inner.is_directory(path)
    }

    fn sync_directory(&self, path: &Path) -> Result<()> {
        self.inner.sync_directory(path)
    }

    fn file_length(&self, path: &Path) -> Result<u64> {
        self.inner.file_length(path)
    }

    fn exists(&self, path: &Path) -> bool {
        self.inner.exists(path)
    }

    fn entropy(&self) -> u64 {
        self.inner.entropy()
    }

    fn lock_directory(&self, directory: &Path) -> Result<DirectoryLock> {
        self.inner.lock_directory(directory)
    }

    fn lock_directory_shared(&self, directory: &Path) -> Result<DirectoryLock> {
        self.inner.lock_directory_shared(directory)
    }
}

/// A file whose descriptor the budget may close while it is clean.
struct LimitedFile {
    file_system: Arc<dyn FileSystem>,
    path: PathBuf,
    writable: bool,
    budget: Arc<Budget>,
    me: Weak<LimitedFile>,
    handle: Mutex<Option<Arc<dyn File>>>,
    last_used: AtomicU64,
    /// Mutating calls begun (counted under `handle`'s lock) and finished.
    writes_started: AtomicU64,
    writes_finished: AtomicU64,
    /// Writes that had finished when the last successful whole-file sync
    /// began: all of them are durable.
    synced_writes: AtomicU64,
}

impl LimitedFile {
    fn touch(&self) {
        let tick = self.budget.tick.fetch_add(1, Ordering::Relaxed);
        self.last_used.store(tick, Ordering::Relaxed);
    }

    fn is_open(&self) -> bool {
        lock(&self.handle).is_some()
    }

    /// The open descriptor, reopened if the budget closed it; a write
    /// counts itself as begun before the lock is released.
    fn descriptor(&self, for_write: bool) -> Result<Arc<dyn File>> {
        self.touch();
        let mut handle = lock(&self.handle);
        if for_write {
            self.writes_started.fetch_add(1, Ordering::AcqRel);
        }
        if let Some(file) = handle.as_ref() {
            return Ok(Arc::clone(file));
        }
        let reopened = self.file_system.open(&self.path, self.writable);
        let file = match reopened {
            Ok(file) => file,
            Err(error) => {
                if for_write {
                    self.writes_finished.fetch_add(1, Ordering::AcqRel);
                }
                return Err(error);
            }
        };
        *handle = Some(Arc::clone(&file));
        drop(handle);
        self.budget.reopened_total.fetch_add(1, Ordering::Relaxed);
        if let Some(me) = self.me.upgrade() {
            self.budget.opened(&me);
        }
        Ok(file)
    }

    fn write<T>(&self, operation: impl FnOnce(&dyn File) -> Result<T>) -> Result<T> {
        let file = self.descriptor(true)?;
        let result = operation(file.as_ref());
        self.writes_finished.fetch_add(1, Ordering::AcqRel);
        result
    }

    fn sync_whole(&self, operation: impl FnOnce(&dyn File) -> Result<()>) -> Result<()> {
        let file = self.descriptor(false)?;
        let covered = self.writes_finished.load(Ordering::Acquire);
        operation(file.as_ref())?;
        self.synced_writes.fetch_max(covered, Ordering::AcqRel);
        Ok(())
    }

    /// Closes the descriptor if nothing written through it can still fail
    /// to reach the disk; says whether it did.
    fn close_if_clean(&self) -> bool {
        let mut handle = lock(&self.handle);
        let started = self.writes_started.load(Ordering::Acquire);
        let finished = self.writes_finished.load(Ordering::Acquire);
        let synced = self.synced_writes.load(Ordering::Acquire);
        if handle.is_none() || started != finished || synced != finished {
            return false;
        }
        let closed = handle.take();
        drop(handle);
        drop(closed);
        true
    }
}

impl File for LimitedFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn read_at(&self, position: u64, buffer: &mut [u8]) -> Result<usize> {
        self.descriptor(false)?.read_at(position, buffer)
    }

    fn write_at(&self, position: u64, bytes: &[u8]) -> Result<()> {
        self.write(|file| file.write_at(position, bytes))
    }

    fn write_vectored_at(&self, position: u64, parts: &[&[u8]]) -> Result<()> {
        self.write(|file| file.write_vectored_at(position, parts))
    }

    fn sync_range(&self, start: u64, end: u64) -> Result<()> {
        let file = self.descriptor(false)?;
        if file.syncs_whole_file() {
            let covered = self.writes_finished.load(Ordering::Acquire);
            file.sync_range(start, end)?;
            self.synced_writes.fetch_max(covered, Ordering::AcqRel);
            return Ok(());
        }
        file.sync_range(start, end)
    }

    fn sync_all(&self) -> Result<()> {
        self.sync_whole(|file| file.sync_all())
    }

    fn set_length(&self, length_bytes: u64) -> Result<()> {
        self.write(|file| file.set_length(length_bytes))
    }

    fn allocate(&self, length_bytes: u64) -> Result<()> {
        self.write(|file| file.allocate(length_bytes))
    }

    fn length(&self) -> Result<u64> {
        self.descriptor(false)?.length()
    }

    fn syncs_whole_file(&self) -> bool {
        false
    }
}
