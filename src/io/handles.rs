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
//! in-memory backend) becomes clean only through `sync_all`, or through a
//! successful [`FileSystemSync`] that began after its writes had finished
//! (`File::synced_by_file_system`: the group sync). Dirty handles
//! stay open, so the limit can be exceeded by the number of files with
//! unsynced writes (streams between a write and its sync).
//!
//! Writers bump `writes_started` under the handle's lock, the same lock the
//! closing takes, so a handle is never closed under a write that has begun.

use super::{DirectoryLock, File, FileSystem, FileSystemSync};
use crate::error::Result;
use crate::lock;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// Default bound on open data files across a store.
pub const OPEN_FILES_MAX_DEFAULT: usize = 512;

struct Budget {
    open_max: usize,
    tick: AtomicU64,
    open: Mutex<OpenList>,
    closed_total: AtomicU64,
    reopened_total: AtomicU64,
}

/// Handles that may be open, and when to look at them again: a pass over
/// the list (O(n log n)) runs when the limit is passed (it closes down to
/// 7/8 of it, so once per `step` opens), or, while dirty handles keep more
/// open, once per `step` opens beyond the last count, or
/// once `step` handles turned clean after a pass that could not reach its
/// target (all the others were dirty), never at every open or sync.
struct OpenList {
    entries: Vec<Weak<LimitedFile>>,
    /// The next pass runs when `entries` grows beyond this.
    threshold: usize,
    /// The last pass left more open than its target.
    excess_left: bool,
    /// Handles made clean since the last pass.
    cleaned: usize,
}

impl Budget {
    fn step(&self) -> usize {
        (self.open_max / 8).max(1)
    }

    /// Records that `file` opened its descriptor; beyond the limit, closes
    /// the least recently used clean others down to 7/8 of it.
    fn opened(&self, file: &Arc<LimitedFile>) {
        let mut open = lock(&self.open);
        open.entries.push(Arc::downgrade(file));
        if open.entries.len() > open.threshold {
            self.pass(open, Some(file));
        }
    }

    /// A handle turned clean (a whole-file sync): it may close now.
    fn cleaned(&self) {
        let mut open = lock(&self.open);
        if !open.excess_left {
            return;
        }
        open.cleaned += 1;
        if open.cleaned >= self.step() {
            self.pass(open, None);
        }
    }

    fn pass(&self, mut open: MutexGuard<'_, OpenList>, keep: Option<&Arc<LimitedFile>>) {
        open.entries
            .retain(|entry| entry.upgrade().is_some_and(|live| live.is_open()));
        let target = (self.open_max - self.open_max / 8).max(1);
        let mut excess = open.entries.len().saturating_sub(target);
        // Ticks move while we sort: sort a snapshot of them.
        let mut candidates: Vec<(u64, Arc<LimitedFile>)> = open
            .entries
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|live| keep.is_none_or(|keep| !Arc::ptr_eq(live, keep)))
            .map(|live| (live.last_used.load(Ordering::Relaxed), live))
            .collect();
        drop(open);
        candidates.sort_unstable_by_key(|(tick, _)| *tick);
        // Closing takes each file's own lock: never while holding ours.
        for (_, candidate) in candidates {
            if excess == 0 {
                break;
            }
            if candidate.close_if_clean() {
                self.closed_total.fetch_add(1, Ordering::Relaxed);
                excess -= 1;
            }
        }
        let mut open = lock(&self.open);
        open.entries
            .retain(|entry| entry.upgrade().is_some_and(|live| live.is_open()));
        // Within the limit: the next pass when it is passed again (at least
        // `step` opens away, the pass went down to 7/8). Dirty handles kept
        // it above: `step` more opens, or `step` handles made clean.
        let open_now = open.entries.len();
        open.threshold = if open_now <= self.open_max {
            self.open_max
        } else {
            open_now + self.step()
        };
        open.excess_left = open.entries.len() > target;
        open.cleaned = 0;
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
                open: Mutex::new(OpenList {
                    entries: Vec::new(),
                    threshold: open_max.max(1),
                    excess_left: false,
                    cleaned: 0,
                }),
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
            .entries
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

    fn file_system_sync(&self, directory: &Path) -> Result<Option<Arc<dyn FileSystemSync>>> {
        self.inner.file_system_sync(directory)
    }

    fn same_file_system(&self, a: &Path, b: &Path) -> bool {
        self.inner.same_file_system(a, b)
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
        // The descriptor may be closed now: let go of it first.
        drop(file);
        self.synced(covered);
        Ok(())
    }

    /// A sync of the whole file (or of its file system) that began after
    /// `covered` writes succeeded. The caller holds no descriptor of it.
    fn synced(&self, covered: u64) {
        self.synced_writes.fetch_max(covered, Ordering::AcqRel);
        self.budget.cleaned();
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
            drop(file);
            self.synced(covered);
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

    fn writes_finished(&self) -> u64 {
        self.writes_finished.load(Ordering::Acquire)
    }

    fn synced_by_file_system(&self, writes_finished: u64) {
        self.synced(writes_finished);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::memory::MemoryFileSystem;

    #[test]
    fn dirty_handles_stay_open_and_closed_ones_reopen_on_use() {
        let memory = MemoryFileSystem::new();
        memory.create_directory(Path::new("/d")).unwrap();
        let limited = HandleLimit::new(Arc::new(memory.clone()), 1);
        let first = limited.create(Path::new("/d/first")).unwrap();
        first.write_at(0, b"alpha").unwrap();
        // Over the limit, but the only other handle is dirty: nothing closes.
        let second = limited.create(Path::new("/d/second")).unwrap();
        assert_eq!(limited.open_count(), 2);
        assert_eq!(limited.closed_and_reopened_total(), (0, 0));
        // A range sync of the in-memory backend covers only its range: it
        // does not make the handle clean. Passes are amortized: the next
        // open does not start one.
        first.sync_range(0, 5).unwrap();
        let third = limited.create(Path::new("/d/third")).unwrap();
        assert_eq!(limited.open_count(), 3);
        // A whole-file sync does, and the pass it starts closes the least
        // recently used clean handles down to the limit.
        first.sync_all().unwrap();
        assert_eq!(limited.open_count(), 1);
        assert_eq!(limited.closed_and_reopened_total(), (2, 0));
        let fourth = limited.create(Path::new("/d/fourth")).unwrap();
        // A closed handle reopens by path on its next use.
        second.write_at(0, b"beta").unwrap();
        assert_eq!(limited.closed_and_reopened_total(), (4, 1));
        let mut buffer = [0u8; 5];
        assert_eq!(first.read_at(0, &mut buffer).unwrap(), 5);
        assert_eq!(&buffer, b"alpha");
        assert_eq!(limited.closed_and_reopened_total(), (4, 2));
        drop((third, fourth));
    }
}
