//! An in-memory file system for tests and the simulator: it can crash and
//! inject faults, so durability claims are tested without pulling power
//! cords. Deterministic: the same calls with the same seed give the same
//! bytes.
//!
//! Crash model (docs/FORMAT.md section 8): every file keeps the bytes it
//! had at its last sync. After a crash a synced byte is always there; a
//! page written since its last sync may hold its old contents, its new
//! contents, or a mix of 512-byte sectors of both, independently of every
//! other page (writeback has no order). A directory entry (a created,
//! renamed or removed file or directory) survives only if its directory was
//! synced afterwards. A file's length is metadata: growth is made durable by
//! the next sync of the file, a shrink only by `sync_all`.
//!
//! [`MemoryFileSystem::crash_after_operations`] stops the machine at its
//! k-th mutating operation (create, write, sync, set length, allocate,
//! remove, rename, make directory, sync directory): that operation and every
//! later one fail, and a write cut by the crash may have reached the page
//! cache in part. [`MemoryFileSystem::crash`] then gives the disk as it
//! could be found afterwards.
//!
//! Faults: a failed sync once (the kernel drops the dirty pages and the
//! next sync succeeds: fsyncgate) or for good, any operation failing with an
//! errno for matching paths, a space limit (ENOSPC), bit flips and cuts.

use super::{File, FileSystem, FileSystemSync};
use crate::error::{Error, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

const PAGE_BYTES: usize = 4096;
const SECTOR_BYTES: usize = 512;

/// The mutating operations the file system counts and can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Create,
    Write,
    Sync,
    /// A sync of the whole file system (`syncfs`); also counts as a sync
    /// for [`MemoryFileSystem::fail_syncs_after`].
    SyncFileSystem,
    SetLength,
    Allocate,
    Remove,
    Rename,
    MakeDirectory,
    SyncDirectory,
}

/// A fault: operations of this kind on paths containing `path_contains`
/// fail with `errno`, after `after` of them succeeded, `count` times
/// (`None`: from then on).
#[derive(Debug, Clone)]
pub struct Fault {
    pub operation: Operation,
    pub path_contains: String,
    pub errno: i32,
    pub after: u32,
    pub count: Option<u32>,
}

#[derive(Debug, Default, Clone)]
struct FileContents {
    data: Vec<u8>,
    durable: Vec<u8>,
    /// Pages written since they were last made durable.
    dirty: BTreeSet<usize>,
}

#[derive(Debug, Default)]
struct MemoryFile {
    contents: Mutex<FileContents>,
}

impl MemoryFile {
    fn lock(&self) -> MutexGuard<'_, FileContents> {
        self.contents
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn with(contents: FileContents) -> Arc<MemoryFile> {
        Arc::new(MemoryFile {
            contents: Mutex::new(contents),
        })
    }
}

#[derive(Debug)]
struct State {
    files: BTreeMap<PathBuf, Arc<MemoryFile>>,
    durable_files: BTreeMap<PathBuf, Arc<MemoryFile>>,
    directories: BTreeSet<PathBuf>,
    durable_directories: BTreeSet<PathBuf>,
    operations: u64,
    crash_after: Option<u64>,
    crashed: bool,
    faults: Vec<Fault>,
    /// Successful syncs left before every sync fails; `None`: never.
    syncs_before_failure: Option<u64>,
    space_limit_bytes: u64,
    random: SplitMix,
}

/// In-memory [`FileSystem`] with crash simulation and fault injection.
#[derive(Debug, Clone)]
pub struct MemoryFileSystem {
    state: Arc<Mutex<State>>,
    /// While set, every sync waits (a slow disk, to line requests up).
    syncs_paused: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

impl Default for MemoryFileSystem {
    fn default() -> Self {
        MemoryFileSystem::new()
    }
}

/// A small deterministic generator, so a failing crash test can be replayed
/// from its seed.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut value = self.0;
        value = (value ^ (value >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        value = (value ^ (value >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        value ^ (value >> 31)
    }
}

fn parent_of(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

fn not_found(path: &Path) -> Error {
    Error::io(
        format!("cannot open {}", path.display()),
        std::io::Error::from(std::io::ErrorKind::NotFound),
    )
}

fn crashed_error() -> Error {
    Error::Injected("the simulated machine crashed".to_string())
}

fn pages(start: usize, end: usize) -> std::ops::Range<usize> {
    if start >= end {
        return 0..0;
    }
    start / PAGE_BYTES..end.div_ceil(PAGE_BYTES)
}

impl MemoryFileSystem {
    pub fn new() -> MemoryFileSystem {
        MemoryFileSystem::with_seed(0)
    }

    /// A file system whose entropy and cut writes follow `seed`.
    pub fn with_seed(seed: u64) -> MemoryFileSystem {
        MemoryFileSystem {
            state: Arc::new(Mutex::new(State {
                files: BTreeMap::new(),
                durable_files: BTreeMap::new(),
                directories: BTreeSet::new(),
                durable_directories: BTreeSet::new(),
                operations: 0,
                crash_after: None,
                crashed: false,
                faults: Vec::new(),
                syncs_before_failure: None,
                space_limit_bytes: u64::MAX,
                random: SplitMix(seed ^ 0x005e_ed0f_fa17),
            })),
            syncs_paused: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes every sync (of a file or of the file system) wait until
    /// [`resume_syncs`](Self::resume_syncs): a disk that is slow for as
    /// long as a test needs to queue work behind a sync.
    pub fn pause_syncs(&self) {
        *crate::lock(&self.syncs_paused.0) = true;
    }

    pub fn resume_syncs(&self) {
        *crate::lock(&self.syncs_paused.0) = false;
        self.syncs_paused.1.notify_all();
    }

    fn wait_while_syncs_paused(&self) {
        let (paused, resumed) = &*self.syncs_paused;
        let mut paused = crate::lock(paused);
        while *paused {
            paused = resumed
                .wait(paused)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// After `successful_syncs` more syncs succeed, every sync fails with EIO.
    pub fn fail_syncs_after(&self, successful_syncs: u64) {
        self.lock().syncs_before_failure = Some(successful_syncs);
    }

    /// The next sync of a file whose path contains `path_contains` fails
    /// with EIO once; its dirty pages are dropped (never written), and the
    /// sync after it succeeds, as Linux does.
    pub fn fail_next_sync(&self, path_contains: &str) {
        self.inject(Fault {
            operation: Operation::Sync,
            path_contains: path_contains.to_string(),
            errno: libc::EIO,
            after: 0,
            count: Some(1),
        });
    }

    /// Adds a fault.
    pub fn inject(&self, fault: Fault) {
        self.lock().faults.push(fault);
    }

    /// Removes every fault (the disk works again).
    pub fn clear_faults(&self) {
        let mut state = self.lock();
        state.faults.clear();
        state.syncs_before_failure = None;
        state.space_limit_bytes = u64::MAX;
    }

    /// Limits the bytes all files may occupy; growth beyond fails with ENOSPC.
    pub fn set_space_limit(&self, bytes: u64) {
        self.lock().space_limit_bytes = bytes;
    }

    /// The machine crashes at the `operation`-th mutating operation from
    /// now on (1: the next one): it and every later one fail.
    pub fn crash_after_operations(&self, operations: u64) {
        let mut state = self.lock();
        state.crash_after = Some(state.operations + operations);
    }

    /// Mutating operations done so far (crash points for
    /// [`crash_after_operations`](MemoryFileSystem::crash_after_operations)).
    pub fn operations(&self) -> u64 {
        self.lock().operations
    }

    /// True once a crash point was reached.
    pub fn has_crashed(&self) -> bool {
        self.lock().crashed
    }

    /// Flips one bit of a file, in memory and on disk (as bit rot would).
    pub fn flip_bit(&self, path: &Path, bit: u64) -> Result<()> {
        let file = self.file(path)?;
        let mut contents = file.lock();
        let byte = (bit / 8) as usize;
        if byte >= contents.data.len() {
            return Err(Error::InvalidInput(format!(
                "bit {bit} is outside {}",
                path.display()
            )));
        }
        contents.data[byte] ^= 1 << (bit % 8);
        if byte < contents.durable.len() {
            contents.durable[byte] ^= 1 << (bit % 8);
        }
        Ok(())
    }

    /// Cuts a file to `length` bytes, in memory and on disk (as another
    /// program's `truncate` would).
    pub fn truncate_file(&self, path: &Path, length: u64) -> Result<()> {
        let file = self.file(path)?;
        let mut contents = file.lock();
        contents.data.truncate(length as usize);
        contents.durable.truncate(length as usize);
        let last_page = (length as usize).div_ceil(PAGE_BYTES);
        contents.dirty.retain(|page| *page < last_page);
        Ok(())
    }

    /// Bytes of a file as they are on disk now.
    pub fn durable_bytes(&self, path: &Path) -> Result<Vec<u8>> {
        let state = self.lock();
        let file = state
            .durable_files
            .get(path)
            .cloned()
            .ok_or_else(|| not_found(path))?;
        drop(state);
        let bytes = file.lock().durable.clone();
        Ok(bytes)
    }

    /// The file system as it could be found after power loss now. The seed
    /// picks which unsynced pages and sectors made it to disk.
    pub fn crash(&self, seed: u64) -> MemoryFileSystem {
        let mut random = SplitMix(seed);
        let state = self.lock();
        let mut files = BTreeMap::new();
        for (path, file) in &state.durable_files {
            if !state.directory_is_durable(&parent_of(path)) {
                continue;
            }
            let torn = tear(&file.lock(), &mut random);
            files.insert(
                path.clone(),
                MemoryFile::with(FileContents {
                    data: torn.clone(),
                    durable: torn,
                    dirty: BTreeSet::new(),
                }),
            );
        }
        let directories: BTreeSet<PathBuf> = state
            .directories
            .iter()
            .filter(|directory| state.directory_is_durable(directory))
            .cloned()
            .collect();
        MemoryFileSystem {
            state: Arc::new(Mutex::new(State {
                durable_files: files.clone(),
                files,
                durable_directories: directories.clone(),
                directories,
                operations: 0,
                crash_after: None,
                crashed: false,
                faults: Vec::new(),
                syncs_before_failure: None,
                space_limit_bytes: u64::MAX,
                random: SplitMix(random.next()),
            })),
            syncs_paused: Arc::default(),
        }
    }

    fn file(&self, path: &Path) -> Result<Arc<MemoryFile>> {
        self.lock()
            .files
            .get(path)
            .cloned()
            .ok_or_else(|| not_found(path))
    }

    fn wrap(&self, path: &Path, file: Arc<MemoryFile>, writable: bool) -> Arc<dyn File> {
        Arc::new(MemoryHandle {
            file,
            path: path.to_path_buf(),
            file_system: self.clone(),
            writable,
        })
    }
}

impl State {
    /// A directory survives a crash if its entry and every parent's did
    /// (the root always does).
    fn directory_is_durable(&self, directory: &Path) -> bool {
        match directory.parent() {
            None => true,
            Some(parent) => {
                self.durable_directories.contains(directory) && self.directory_is_durable(parent)
            }
        }
    }

    /// Counts one mutating operation and applies crash points and faults.
    fn operation(&mut self, operation: Operation, path: &Path) -> Result<()> {
        if self.crashed {
            return Err(crashed_error());
        }
        self.operations += 1;
        if self.crash_after.is_some_and(|at| self.operations >= at) {
            self.crashed = true;
            return Err(crashed_error());
        }
        let path_text = path.to_string_lossy();
        let matched = self.faults.iter_mut().position(|fault| {
            fault.operation == operation
                && path_text.contains(&fault.path_contains)
                && fault.count != Some(0)
        });
        if let Some(index) = matched {
            let fault = &mut self.faults[index];
            if fault.after > 0 {
                fault.after -= 1;
            } else {
                if let Some(count) = fault.count.as_mut() {
                    *count -= 1;
                }
                let errno = fault.errno;
                return Err(Error::io(
                    format!("{operation:?} of {} failed (injected)", path.display()),
                    std::io::Error::from_raw_os_error(errno),
                ));
            }
        }
        if matches!(operation, Operation::Sync | Operation::SyncFileSystem) {
            match self.syncs_before_failure {
                Some(0) => {
                    return Err(Error::io(
                        format!("sync of {} failed (injected)", path.display()),
                        std::io::Error::from_raw_os_error(libc::EIO),
                    ))
                }
                Some(left) => self.syncs_before_failure = Some(left - 1),
                None => {}
            }
        }
        Ok(())
    }

    fn allocated_bytes(&self) -> u64 {
        self.files
            .values()
            .map(|file| file.lock().data.len() as u64)
            .sum()
    }

    fn reserve(&self, path: &Path, extra_bytes: u64) -> Result<()> {
        if self.allocated_bytes().saturating_add(extra_bytes) > self.space_limit_bytes {
            return Err(Error::io(
                format!("cannot allocate {extra_bytes} bytes for {}", path.display()),
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            ));
        }
        Ok(())
    }
}

/// One possible on-disk image of a file after a crash.
fn tear(contents: &FileContents, random: &mut SplitMix) -> Vec<u8> {
    let mut result = contents.durable.clone();
    // The length is metadata: it is the durable one.
    let length = result.len().min(contents.data.len());
    for &page in &contents.dirty {
        let page_start = page * PAGE_BYTES;
        if page_start >= length {
            continue;
        }
        let page_end = (page_start + PAGE_BYTES).min(length);
        match random.next() % 3 {
            0 => {}
            1 => result[page_start..page_end].copy_from_slice(&contents.data[page_start..page_end]),
            _ => {
                for sector_start in (page_start..page_end).step_by(SECTOR_BYTES) {
                    let sector_end = (sector_start + SECTOR_BYTES).min(page_end);
                    if random.next() % 2 == 0 {
                        result[sector_start..sector_end]
                            .copy_from_slice(&contents.data[sector_start..sector_end]);
                    }
                }
            }
        }
    }
    result
}

impl FileSystem for MemoryFileSystem {
    fn create(&self, path: &Path) -> Result<Arc<dyn File>> {
        let mut state = self.lock();
        state.operation(Operation::Create, path)?;
        if state.files.contains_key(path) {
            return Err(Error::io(
                format!("cannot create {}", path.display()),
                std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            ));
        }
        if !state.directories.contains(&parent_of(path)) {
            return Err(not_found(&parent_of(path)));
        }
        let file = MemoryFile::with(FileContents::default());
        state.files.insert(path.to_path_buf(), Arc::clone(&file));
        drop(state);
        Ok(self.wrap(path, file, true))
    }

    fn open(&self, path: &Path, writable: bool) -> Result<Arc<dyn File>> {
        let file = self.file(path)?;
        Ok(self.wrap(path, file, writable))
    }

    fn read(&self, path: &Path) -> Result<Vec<u8>> {
        Ok(self.file(path)?.lock().data.clone())
    }

    fn remove(&self, path: &Path) -> Result<()> {
        let mut state = self.lock();
        state.operation(Operation::Remove, path)?;
        state
            .files
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| not_found(path))
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        let mut state = self.lock();
        state.operation(Operation::Rename, from)?;
        if !state.directories.contains(&parent_of(to)) {
            return Err(not_found(&parent_of(to)));
        }
        let file = state.files.remove(from).ok_or_else(|| not_found(from))?;
        state.files.insert(to.to_path_buf(), file);
        Ok(())
    }

    fn list(&self, directory: &Path) -> Result<Vec<String>> {
        let state = self.lock();
        if !state.directories.contains(directory) {
            return Err(not_found(directory));
        }
        let files = state.files.keys();
        let directories = state.directories.iter();
        let mut names: Vec<String> = files
            .chain(directories)
            .filter(|path| path.parent() == Some(directory))
            .filter_map(|path| path.file_name()?.to_str().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    fn make_directory(&self, path: &Path) -> Result<()> {
        let mut state = self.lock();
        state.operation(Operation::MakeDirectory, path)?;
        if state.files.contains_key(path) {
            return Err(Error::io(
                format!("cannot create directory {}", path.display()),
                std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            ));
        }
        state.directories.insert(path.to_path_buf());
        Ok(())
    }

    fn is_directory(&self, path: &Path) -> bool {
        self.lock().directories.contains(path)
    }

    fn sync_directory(&self, path: &Path) -> Result<()> {
        let mut state = self.lock();
        state.operation(Operation::SyncDirectory, path)?;
        let State {
            files,
            durable_files,
            directories,
            durable_directories,
            ..
        } = &mut *state;
        durable_files.retain(|file, _| file.parent() != Some(path));
        durable_files.extend(
            files
                .iter()
                .filter(|(file, _)| file.parent() == Some(path))
                .map(|(file, contents)| (file.clone(), Arc::clone(contents))),
        );
        durable_directories.retain(|directory| directory.parent() != Some(path));
        durable_directories.extend(
            directories
                .iter()
                .filter(|directory| directory.parent() == Some(path))
                .cloned(),
        );
        Ok(())
    }

    fn file_system_sync(&self, directory: &Path) -> Result<Option<Arc<dyn FileSystemSync>>> {
        Ok(Some(Arc::new(MemoryFileSystemSync {
            file_system: self.clone(),
            directory: directory.to_path_buf(),
        })))
    }

    fn same_file_system(&self, _a: &Path, _b: &Path) -> bool {
        true
    }

    fn file_length(&self, path: &Path) -> Result<u64> {
        Ok(self.file(path)?.lock().data.len() as u64)
    }

    fn exists(&self, path: &Path) -> bool {
        let state = self.lock();
        state.files.contains_key(path) || state.directories.contains(path)
    }

    fn entropy(&self) -> u64 {
        self.lock().random.next()
    }
}

/// `syncfs` of the in-memory file system: one operation (a crash point, and
/// a [`Operation::SyncFileSystem`] fault on `directory`) that makes every file's data
/// durable, but no directory entry (as the code never relies on it for
/// those). A failure loses every file's unsynced pages, as a failed
/// write-back may.
#[derive(Debug)]
struct MemoryFileSystemSync {
    file_system: MemoryFileSystem,
    directory: PathBuf,
}

impl FileSystemSync for MemoryFileSystemSync {
    fn sync(&self) -> Result<()> {
        self.file_system.wait_while_syncs_paused();
        let mut state = self.file_system.lock();
        let result = state.operation(Operation::SyncFileSystem, &self.directory);
        let files: Vec<Arc<MemoryFile>> = state.files.values().cloned().collect();
        drop(state);
        for file in files {
            let mut contents = file.lock();
            match &result {
                Ok(()) => {
                    contents.durable = contents.data.clone();
                    contents.dirty.clear();
                }
                Err(Error::Io { .. }) => contents.dirty.clear(),
                Err(_) => {}
            }
        }
        result
    }
}

struct MemoryHandle {
    file: Arc<MemoryFile>,
    path: PathBuf,
    file_system: MemoryFileSystem,
    writable: bool,
}

impl MemoryHandle {
    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::io(
                format!("{} was opened read-only", self.path.display()),
                std::io::Error::from_raw_os_error(libc::EBADF),
            ))
        }
    }

    /// Counts `operation` and reserves the space a change of the file to
    /// `length_bytes` takes (a full disk fails it before anything changes).
    fn reserve_growth(&self, length_bytes: u64, operation: Operation) -> Result<()> {
        self.check_writable()?;
        let mut state = self.file_system.lock();
        let current = self.file.lock().data.len() as u64;
        if length_bytes > current {
            state.reserve(&self.path, length_bytes - current)?;
        }
        state.operation(operation, &self.path)
    }
}

impl File for MemoryHandle {
    fn path(&self) -> &Path {
        &self.path
    }

    fn read_at(&self, position: u64, buffer: &mut [u8]) -> Result<usize> {
        let contents = self.file.lock();
        let start = (position as usize).min(contents.data.len());
        let end = (start + buffer.len()).min(contents.data.len());
        buffer[..end - start].copy_from_slice(&contents.data[start..end]);
        Ok(end - start)
    }

    fn write_at(&self, position: u64, bytes: &[u8]) -> Result<()> {
        self.check_writable()?;
        let mut state = self.file_system.lock();
        let end = position as usize + bytes.len();
        let length = self.file.lock().data.len();
        if end > length {
            state.reserve(&self.path, (end - length) as u64)?;
        }
        let mut written = bytes.len();
        if let Err(error) = state.operation(Operation::Write, &self.path) {
            if !state.crashed {
                return Err(error);
            }
            // The crash came in the middle of this write: a prefix of it,
            // in whole sectors, may have reached the page cache.
            written =
                (state.random.next() as usize % (bytes.len() + 1)) / SECTOR_BYTES * SECTOR_BYTES;
            if written == 0 {
                return Err(error);
            }
            apply_write(&mut self.file.lock(), position as usize, &bytes[..written]);
            return Err(error);
        }
        drop(state);
        apply_write(&mut self.file.lock(), position as usize, &bytes[..written]);
        Ok(())
    }

    fn sync_range(&self, start: u64, end: u64) -> Result<()> {
        self.file_system.wait_while_syncs_paused();
        let mut state = self.file_system.lock();
        let result = state.operation(Operation::Sync, &self.path);
        drop(state);
        let mut contents = self.file.lock();
        let range = pages(start as usize, end as usize);
        if let Err(error) = result {
            if matches!(&error, Error::Io { .. }) {
                // fsyncgate: the kernel marks the pages clean although they
                // never reached the disk; a later sync reports success.
                contents.dirty.retain(|page| !range.contains(page));
            }
            return Err(error);
        }
        let FileContents {
            data,
            durable,
            dirty,
        } = &mut *contents;
        if data.len() > durable.len() {
            durable.resize(data.len(), 0);
        }
        let synced: Vec<usize> = dirty.range(range).copied().collect();
        for page in synced {
            let page_start = page * PAGE_BYTES;
            let page_end = (page_start + PAGE_BYTES).min(data.len());
            if page_start < page_end {
                durable[page_start..page_end].copy_from_slice(&data[page_start..page_end]);
            }
            dirty.remove(&page);
        }
        Ok(())
    }

    fn sync_all(&self) -> Result<()> {
        self.file_system.wait_while_syncs_paused();
        let mut state = self.file_system.lock();
        let result = state.operation(Operation::Sync, &self.path);
        drop(state);
        let mut contents = self.file.lock();
        if let Err(error) = result {
            if matches!(&error, Error::Io { .. }) {
                contents.dirty.clear();
            }
            return Err(error);
        }
        contents.durable = contents.data.clone();
        contents.dirty.clear();
        Ok(())
    }

    fn set_length(&self, length_bytes: u64) -> Result<()> {
        self.reserve_growth(length_bytes, Operation::SetLength)?;
        let mut contents = self.file.lock();
        let old = contents.data.len();
        contents.data.resize(length_bytes as usize, 0);
        let new = contents.data.len();
        if new > old {
            let grown = pages(old, new);
            contents.dirty.extend(grown);
        } else {
            let last_page = new.div_ceil(PAGE_BYTES);
            contents.dirty.retain(|page| *page < last_page);
            if new % PAGE_BYTES != 0 {
                contents.dirty.insert(new / PAGE_BYTES);
            }
        }
        Ok(())
    }

    fn allocate(&self, length_bytes: u64) -> Result<()> {
        self.reserve_growth(length_bytes, Operation::Allocate)?;
        let mut contents = self.file.lock();
        if (length_bytes as usize) > contents.data.len() {
            contents.data.resize(length_bytes as usize, 0);
        }
        Ok(())
    }

    fn length(&self) -> Result<u64> {
        Ok(self.file.lock().data.len() as u64)
    }
}

fn apply_write(contents: &mut FileContents, position: usize, bytes: &[u8]) {
    let end = position + bytes.len();
    if end > contents.data.len() {
        contents.data.resize(end, 0);
    }
    contents.data[position..end].copy_from_slice(bytes);
    contents.dirty.extend(pages(position, end));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn directory(file_system: &MemoryFileSystem) -> PathBuf {
        let directory = PathBuf::from("/d");
        file_system.create_directory(&directory).unwrap();
        directory
    }

    #[test]
    fn only_synced_bytes_and_entries_surely_survive_a_crash() {
        let file_system = MemoryFileSystem::new();
        let directory = directory(&file_system);
        let path = directory.join("a");
        let file = file_system.create(&path).unwrap();
        file.allocate(3 * PAGE_BYTES as u64).unwrap();
        file.write_at(0, &[1; 100]).unwrap();
        file.sync_range(0, 100).unwrap();
        file_system.sync_directory(&directory).unwrap();
        file.write_at(PAGE_BYTES as u64, &[2; 100]).unwrap();
        let unsynced = file_system.create(&directory.join("b")).unwrap();
        unsynced.write_at(0, &[3; 10]).unwrap();
        unsynced.sync_all().unwrap();
        for seed in 0..20 {
            let after = file_system.crash(seed);
            let bytes = after.read(&path).unwrap();
            assert_eq!(&bytes[..100], &[1; 100][..]);
            assert!(!after.exists(&directory.join("b")), "entry never synced");
        }
    }

    #[test]
    fn a_failed_sync_drops_the_pages_and_the_next_sync_succeeds() {
        let file_system = MemoryFileSystem::new();
        let directory = directory(&file_system);
        let path = directory.join("a");
        let file = file_system.create(&path).unwrap();
        file_system.sync_directory(&directory).unwrap();
        file.write_at(0, &[7; 100]).unwrap();
        file_system.fail_next_sync("/d/a");
        assert!(file.sync_range(0, 100).is_err());
        file.sync_range(0, 100)
            .expect("the next sync reports success, as Linux does");
        for seed in 0..20 {
            let bytes = file_system.crash(seed).read(&path).unwrap();
            assert!(
                bytes.iter().all(|byte| *byte == 0),
                "the dropped pages never reached the disk"
            );
        }
    }

    #[test]
    fn sticky_sync_failure_space_limit_and_crash_points() {
        let file_system = MemoryFileSystem::new();
        let directory = directory(&file_system);
        let file = file_system.create(&directory.join("a")).unwrap();
        file_system.fail_syncs_after(1);
        file.sync_range(0, 10).unwrap();
        assert!(file.sync_range(0, 10).is_err());
        assert!(file.sync_all().is_err(), "a failed sync stays failed");
        file_system.set_space_limit(15);
        let error = file.allocate(20).unwrap_err();
        assert!(matches!(error, Error::DiskFull { .. }), "{error}");
        file_system.clear_faults();
        file_system.crash_after_operations(2);
        file.write_at(0, &[1; 10]).unwrap();
        assert!(
            file.write_at(10, &[1; 10]).is_err(),
            "the second operation crashes"
        );
        assert!(file_system.has_crashed());
        assert!(file_system.create(&directory.join("b")).is_err());
    }
}
