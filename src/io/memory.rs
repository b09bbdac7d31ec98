//! An in-memory file system for tests: it can simulate a crash and inject
//! faults, so durability claims can be tested without pulling power cords.
//!
//! Crash model (see docs/FORMAT.md section 7): every file keeps the bytes it
//! had at its last sync. After [`MemoryFileSystem::crash`], a synced byte is
//! always there; an unsynced 4 KiB page may hold its old contents, its new
//! contents, or a mix of 512-byte sectors of both, independently of every
//! other page (writeback has no order). A directory entry survives only if
//! its directory was synced after it was created, renamed or removed.
//!
//! Faults: a failed sync after N successful ones (every later sync fails
//! too), a space limit (ENOSPC), and bit flips.

use super::{check_range, FileSystem, ReadableFile, WritableFile};
use crate::error::{Error, Result};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

const PAGE_BYTES: usize = 4096;
const SECTOR_BYTES: usize = 512;

#[derive(Debug, Default)]
struct FileContents {
    data: Vec<u8>,
    durable: Vec<u8>,
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
}

#[derive(Debug, Default)]
struct State {
    files: BTreeMap<PathBuf, Arc<MemoryFile>>,
    durable_files: BTreeMap<PathBuf, Arc<MemoryFile>>,
    directories: BTreeSet<PathBuf>,
}

#[derive(Debug)]
struct Faults {
    /// Successful syncs left before every sync fails; negative: never fail.
    syncs_before_failure: AtomicI64,
    space_limit_bytes: AtomicU64,
}

/// In-memory [`FileSystem`] with crash simulation and fault injection.
#[derive(Debug, Clone)]
pub struct MemoryFileSystem {
    state: Arc<Mutex<State>>,
    faults: Arc<Faults>,
}

impl Default for MemoryFileSystem {
    fn default() -> Self {
        MemoryFileSystem::new()
    }
}

/// A small deterministic generator, so a failing crash test can be replayed
/// from its seed.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
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

impl MemoryFileSystem {
    pub fn new() -> MemoryFileSystem {
        MemoryFileSystem {
            state: Arc::new(Mutex::new(State::default())),
            faults: Arc::new(Faults {
                syncs_before_failure: AtomicI64::new(-1),
                space_limit_bytes: AtomicU64::new(u64::MAX),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// After `successful_syncs` more syncs succeed, every sync fails with EIO.
    pub fn fail_syncs_after(&self, successful_syncs: u64) {
        self.faults
            .syncs_before_failure
            .store(successful_syncs as i64, Ordering::SeqCst);
    }

    /// Limits the bytes all files may occupy; allocations beyond fail with ENOSPC.
    pub fn set_space_limit(&self, bytes: u64) {
        self.faults.space_limit_bytes.store(bytes, Ordering::SeqCst);
    }

    /// Flips one bit of a file, in memory and in its durable image.
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

    /// Cuts a file to `length` bytes, durably (as a test's damage).
    pub fn truncate_file(&self, path: &Path, length: u64) -> Result<()> {
        let file = self.file(path)?;
        let mut contents = file.lock();
        contents.data.truncate(length as usize);
        contents.durable.truncate(length as usize);
        Ok(())
    }

    /// The file system as it could be found after power loss now. The seed
    /// picks which unsynced pages and sectors made it to disk.
    pub fn crash(&self, seed: u64) -> MemoryFileSystem {
        let mut random = SplitMix(seed);
        let state = self.lock();
        let mut files = BTreeMap::new();
        for (path, file) in &state.durable_files {
            let contents = file.lock();
            let torn = tear(&contents, &mut random);
            files.insert(
                path.clone(),
                Arc::new(MemoryFile {
                    contents: Mutex::new(FileContents {
                        data: torn.clone(),
                        durable: torn,
                    }),
                }),
            );
        }
        MemoryFileSystem {
            state: Arc::new(Mutex::new(State {
                durable_files: files.clone(),
                files,
                directories: state.directories.clone(),
            })),
            faults: Arc::new(Faults {
                syncs_before_failure: AtomicI64::new(-1),
                space_limit_bytes: AtomicU64::new(u64::MAX),
            }),
        }
    }

    fn file(&self, path: &Path) -> Result<Arc<MemoryFile>> {
        self.lock()
            .files
            .get(path)
            .cloned()
            .ok_or_else(|| not_found(path))
    }

    fn allocated_bytes(state: &State) -> u64 {
        state
            .files
            .values()
            .map(|file| file.lock().data.len() as u64)
            .sum()
    }

    fn reserve(&self, state: &State, path: &Path, extra_bytes: u64) -> Result<()> {
        let limit = self.faults.space_limit_bytes.load(Ordering::SeqCst);
        if Self::allocated_bytes(state).saturating_add(extra_bytes) > limit {
            return Err(Error::io(
                format!("cannot allocate {extra_bytes} bytes for {}", path.display()),
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            ));
        }
        Ok(())
    }

    fn sync_fault(&self, what: &str) -> Result<()> {
        let left = self.faults.syncs_before_failure.load(Ordering::SeqCst);
        if left < 0 {
            return Ok(());
        }
        if left == 0 {
            return Err(Error::io(
                format!("{what} failed (injected)"),
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        self.faults
            .syncs_before_failure
            .fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }

    fn writable(&self, path: &Path, file: Arc<MemoryFile>) -> Arc<dyn WritableFile> {
        Arc::new(MemoryWritable {
            file,
            path: path.to_path_buf(),
            file_system: self.clone(),
        })
    }
}

/// One possible on-disk image of a file after a crash.
fn tear(contents: &FileContents, random: &mut SplitMix) -> Vec<u8> {
    let mut result = contents.durable.clone();
    // The length is metadata: it is the durable one. New bytes beyond it
    // were never made durable and are gone.
    let length = result.len().min(contents.data.len());
    for page_start in (0..length).step_by(PAGE_BYTES) {
        let page_end = (page_start + PAGE_BYTES).min(length);
        if result[page_start..page_end] == contents.data[page_start..page_end] {
            continue;
        }
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
    fn create_preallocated(
        &self,
        path: &Path,
        capacity_bytes: u64,
    ) -> Result<Arc<dyn WritableFile>> {
        let mut state = self.lock();
        if state.files.contains_key(path) {
            return Err(Error::io(
                format!("cannot create {}", path.display()),
                std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            ));
        }
        self.reserve(&state, path, capacity_bytes)?;
        let file = Arc::new(MemoryFile {
            contents: Mutex::new(FileContents {
                data: vec![0; capacity_bytes as usize],
                durable: Vec::new(),
            }),
        });
        state.files.insert(path.to_path_buf(), Arc::clone(&file));
        drop(state);
        Ok(self.writable(path, file))
    }

    fn open_writable(&self, path: &Path, capacity_bytes: u64) -> Result<Arc<dyn WritableFile>> {
        let state = self.lock();
        let file = state
            .files
            .get(path)
            .cloned()
            .ok_or_else(|| not_found(path))?;
        let current = file.lock().data.len() as u64;
        if capacity_bytes > current {
            self.reserve(&state, path, capacity_bytes - current)?;
            file.lock().data.resize(capacity_bytes as usize, 0);
        }
        drop(state);
        Ok(self.writable(path, file))
    }

    fn open_readable(&self, path: &Path) -> Result<Arc<dyn ReadableFile>> {
        Ok(Arc::new(MemoryView {
            file: self.file(path)?,
        }))
    }

    fn read(&self, path: &Path) -> Result<Vec<u8>> {
        Ok(self.file(path)?.lock().data.clone())
    }

    fn read_prefix(&self, path: &Path, length: usize) -> Result<Vec<u8>> {
        let file = self.file(path)?;
        let contents = file.lock();
        Ok(contents.data[..length.min(contents.data.len())].to_vec())
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        self.sync_fault(&format!(
            "fsync of {}",
            super::os::temporary_path(path).display()
        ))?;
        let mut state = self.lock();
        self.reserve(&state, path, bytes.len() as u64)?;
        let file = Arc::new(MemoryFile {
            contents: Mutex::new(FileContents {
                data: bytes.to_vec(),
                durable: bytes.to_vec(),
            }),
        });
        state.files.insert(path.to_path_buf(), Arc::clone(&file));
        // The rename and the directory sync make the new entry durable.
        let directory = parent_of(path);
        sync_entries(&mut state, &directory);
        Ok(())
    }

    fn remove(&self, path: &Path) -> Result<()> {
        self.lock()
            .files
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| not_found(path))
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        let mut state = self.lock();
        let file = state.files.remove(from).ok_or_else(|| not_found(from))?;
        state.files.insert(to.to_path_buf(), file);
        Ok(())
    }

    fn list(&self, directory: &Path) -> Result<Vec<String>> {
        let state = self.lock();
        if !state.directories.contains(directory) {
            return Err(not_found(directory));
        }
        Ok(state
            .files
            .keys()
            .filter(|path| path.parent() == Some(directory))
            .filter_map(|path| path.file_name()?.to_str().map(str::to_string))
            .collect())
    }

    fn create_directory(&self, path: &Path) -> Result<()> {
        let mut state = self.lock();
        let mut current = Some(path);
        while let Some(directory) = current {
            if directory.as_os_str().is_empty() {
                break;
            }
            state.directories.insert(directory.to_path_buf());
            current = directory.parent();
        }
        Ok(())
    }

    fn sync_directory(&self, path: &Path) -> Result<()> {
        sync_entries(&mut self.lock(), path);
        Ok(())
    }

    fn file_length(&self, path: &Path) -> Result<u64> {
        Ok(self.file(path)?.lock().data.len() as u64)
    }

    fn exists(&self, path: &Path) -> bool {
        let state = self.lock();
        state.files.contains_key(path) || state.directories.contains(path)
    }
}

/// Makes the live entries of one directory its durable entries.
fn sync_entries(state: &mut State, directory: &Path) {
    state
        .durable_files
        .retain(|path, _| path.parent() != Some(directory));
    let live: Vec<(PathBuf, Arc<MemoryFile>)> = state
        .files
        .iter()
        .filter(|(path, _)| path.parent() == Some(directory))
        .map(|(path, file)| (path.clone(), Arc::clone(file)))
        .collect();
    state.durable_files.extend(live);
}

struct MemoryWritable {
    file: Arc<MemoryFile>,
    path: PathBuf,
    file_system: MemoryFileSystem,
}

impl WritableFile for MemoryWritable {
    fn write_at(&self, position: u64, bytes: &[u8]) -> Result<()> {
        let mut contents = self.file.lock();
        check_range(
            position,
            position + bytes.len() as u64,
            contents.data.len() as u64,
        )?;
        let start = position as usize;
        contents.data[start..start + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    fn zero_range(&self, start: u64, end: u64) -> Result<()> {
        let mut contents = self.file.lock();
        check_range(start, end, contents.data.len() as u64)?;
        contents.data[start as usize..end as usize].fill(0);
        Ok(())
    }

    fn sync_range(&self, start: u64, end: u64) -> Result<()> {
        self.file_system
            .sync_fault(&format!("sync of {} [{start}, {end})", self.path.display()))?;
        let mut contents = self.file.lock();
        check_range(start, end, contents.data.len() as u64)?;
        let length = contents.data.len();
        contents.durable.resize(length, 0);
        let FileContents { data, durable } = &mut *contents;
        durable[start as usize..end as usize].copy_from_slice(&data[start as usize..end as usize]);
        Ok(())
    }

    fn sync_all(&self) -> Result<()> {
        self.file_system
            .sync_fault(&format!("fsync of {}", self.path.display()))?;
        let mut contents = self.file.lock();
        contents.durable = contents.data.clone();
        Ok(())
    }

    fn set_length(&self, length_bytes: u64) -> Result<()> {
        let mut contents = self.file.lock();
        contents.data.resize(length_bytes as usize, 0);
        Ok(())
    }

    fn capacity(&self) -> u64 {
        self.file.lock().data.len() as u64
    }

    fn view(&self) -> Arc<dyn ReadableFile> {
        Arc::new(MemoryView {
            file: Arc::clone(&self.file),
        })
    }
}

struct MemoryView {
    file: Arc<MemoryFile>,
}

impl ReadableFile for MemoryView {
    fn length(&self) -> u64 {
        self.file.lock().data.len() as u64
    }

    fn bytes(&self, start: u64, end: u64) -> Result<Bytes> {
        let contents = self.file.lock();
        check_range(start, end, contents.data.len() as u64)?;
        Ok(Bytes::copy_from_slice(
            &contents.data[start as usize..end as usize],
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_synced_bytes_and_entries_surely_survive_a_crash() {
        let file_system = MemoryFileSystem::new();
        let directory = Path::new("/d");
        file_system.create_directory(directory).unwrap();
        let path = directory.join("a");
        let file = file_system
            .create_preallocated(&path, 3 * PAGE_BYTES as u64)
            .unwrap();
        file.write_at(0, &[1; 100]).unwrap();
        file.sync_range(0, 100).unwrap();
        file_system.sync_directory(directory).unwrap();
        file.write_at(PAGE_BYTES as u64, &[2; 100]).unwrap();
        let unsynced = file_system
            .create_preallocated(&directory.join("b"), 10)
            .unwrap();
        unsynced.sync_all().unwrap();
        for seed in 0..20 {
            let after = file_system.crash(seed);
            let bytes = after.read(&path).unwrap();
            assert_eq!(&bytes[..100], &[1; 100][..]);
            assert!(!after.exists(&directory.join("b")), "entry never synced");
        }
    }

    #[test]
    fn injected_sync_failure_and_space_limit() {
        let file_system = MemoryFileSystem::new();
        file_system.create_directory(Path::new("/d")).unwrap();
        let file = file_system
            .create_preallocated(Path::new("/d/a"), 10)
            .unwrap();
        file_system.fail_syncs_after(1);
        file.sync_range(0, 10).unwrap();
        assert!(file.sync_range(0, 10).is_err());
        assert!(file.sync_all().is_err(), "a failed sync stays failed");
        file_system.set_space_limit(15);
        let error = file_system
            .create_preallocated(Path::new("/d/b"), 10)
            .err()
            .unwrap();
        assert!(matches!(error, Error::DiskFull { .. }), "{error}");
    }
}
