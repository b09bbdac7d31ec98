//! Frame body transforms: zstd compression and AEAD encryption at rest, per
//! batch frame (docs/FORMAT.md 2.2).
//!
//! Writing: the plain body is compressed if that makes it smaller (the frame
//! flags say which), then encrypted with the stream's key; the AEAD's
//! associated data is the frame header (bytes 8..96), so a changed header
//! fails authentication as surely as a changed body. Reading reverses it.
//!
//! Nonces are 96 bits: a 32-bit epoch that the stream persists and raises on
//! every open (and every truncation), then a 64-bit frame counter. A nonce
//! therefore never repeats under a key, across restarts and after a suffix
//! is truncated and rewritten.
//!
//! Key material lives in [`Key`]s that zeroize on drop and never print; the
//! buffers that hold decrypted bodies are zeroized when the last record
//! borrowing them is dropped.

use crate::error::{Error, Result};
use crate::format::frame::{flags, FrameBuilder, FrameHeader, FRAME_HEADER_LENGTH};
use crate::format::record::RecordIter;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use zeroize::{Zeroize, Zeroizing};

/// Bytes of the AEAD tag appended to an encrypted body.
pub const TAG_LENGTH: usize = 16;
/// Bytes of a key.
pub const KEY_LENGTH: usize = 32;

/// The AEAD of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cipher {
    Aes256Gcm,
    ChaCha20Poly1305,
}

impl Cipher {
    /// The byte stored in the segment header (FORMAT.md 2.1).
    pub fn id(&self) -> u8 {
        match self {
            Cipher::Aes256Gcm => 1,
            Cipher::ChaCha20Poly1305 => 2,
        }
    }

    pub fn from_id(id: u8) -> Option<Cipher> {
        match id {
            1 => Some(Cipher::Aes256Gcm),
            2 => Some(Cipher::ChaCha20Poly1305),
            _ => None,
        }
    }
}

impl std::str::FromStr for Cipher {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Cipher, String> {
        match text {
            "aes-256-gcm" => Ok(Cipher::Aes256Gcm),
            "chacha20-poly1305" => Ok(Cipher::ChaCha20Poly1305),
            other => Err(format!(
                "unknown cipher '{other}' (expected aes-256-gcm or chacha20-poly1305)"
            )),
        }
    }
}

impl std::fmt::Display for Cipher {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            Cipher::Aes256Gcm => "aes-256-gcm",
            Cipher::ChaCha20Poly1305 => "chacha20-poly1305",
        })
    }
}

/// A 256-bit key with its id. Zeroized on drop; never printed.
pub struct Key {
    id: u32,
    material: Zeroizing<[u8; KEY_LENGTH]>,
    /// The expanded key schedule per cipher (by `Cipher::id() - 1`), built
    /// on first use: expanding per frame would cost more than sealing a
    /// small frame.
    schedules: [OnceLock<Schedule>; 2],
}

/// A cipher's expanded key, zeroized when dropped (ring's key types do
/// not zeroize themselves).
struct Schedule {
    key: Box<MaybeUninit<ring::aead::LessSafeKey>>,
}

impl Schedule {
    fn new(cipher: Cipher, material: &[u8; KEY_LENGTH]) -> Schedule {
        let algorithm = match cipher {
            Cipher::Aes256Gcm => &ring::aead::AES_256_GCM,
            Cipher::ChaCha20Poly1305 => &ring::aead::CHACHA20_POLY1305,
        };
        let unbound = ring::aead::UnboundKey::new(algorithm, material)
            .expect("both ciphers take 32-byte keys");
        Schedule {
            key: Box::new(MaybeUninit::new(ring::aead::LessSafeKey::new(unbound))),
        }
    }

    fn key(&self) -> &ring::aead::LessSafeKey {
        // SAFETY: initialized in `new`; only `drop` de-initializes it.
        unsafe { self.key.assume_init_ref() }
    }
}

impl Drop for Schedule {
    fn drop(&mut self) {
        let pointer: *mut MaybeUninit<ring::aead::LessSafeKey> = &mut *self.key;
        // SAFETY: the key was initialized in `new` and is dropped exactly
        // once, here; afterwards its bytes are overwritten through the
        // `MaybeUninit`, for which all-zero bytes are a valid value. ring's
        // keys are flat data (round keys and GHASH tables, no pointers to
        // heap memory), so zeroing the bytes erases the schedule.
        unsafe {
            std::ptr::drop_in_place((*pointer).as_mut_ptr());
            zeroize::zeroize_flat_type(pointer);
        }
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Key")
            .field("id", &self.id)
            .field("material", &"<redacted>")
            .finish()
    }
}

impl Key {
    /// A key from 32 raw bytes.
    pub fn new(id: u32, material: [u8; KEY_LENGTH]) -> Key {
        Key {
            id,
            material: Zeroizing::new(material),
            schedules: [OnceLock::new(), OnceLock::new()],
        }
    }

    /// A key from its text form: 64 hex digits (whitespace around ignored).
    /// `source` names where it came from, for errors (never the key itself).
    pub fn parse(id: u32, text: &str, source: &str) -> Result<Key> {
        let text = Zeroizing::new(text.trim().to_string());
        if text.len() != KEY_LENGTH * 2 || !text.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            return Err(Error::InvalidConfig {
                key: format!("key {id}"),
                reason: format!("{source} must hold exactly 64 hex digits (a 256-bit key); generate one with `openssl rand -hex 32`"),
            });
        }
        let mut material = [0u8; KEY_LENGTH];
        for (index, byte) in material.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[index * 2..index * 2 + 2], 16)
                .expect("checked hex digits");
        }
        let key = Key::new(id, material);
        material.zeroize();
        Ok(key)
    }

    /// Reads a key file.
    pub fn from_file(id: u32, path: &Path) -> Result<Key> {
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|error| {
            Error::io(
                format!("cannot read key file {} (key {id})", path.display()),
                error,
            )
        })?);
        Key::parse(id, &text, &format!("key file {}", path.display()))
    }

    /// Reads a key from an environment variable.
    pub fn from_env(id: u32, variable: &str) -> Result<Key> {
        let text = Zeroizing::new(std::env::var(variable).map_err(|_| Error::InvalidConfig {
            key: format!("key {id}"),
            reason: format!("environment variable {variable} is not set"),
        })?);
        Key::parse(id, &text, &format!("environment variable {variable}"))
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    fn schedule(&self, cipher: Cipher) -> &ring::aead::LessSafeKey {
        self.schedules[usize::from(cipher.id() - 1)]
            .get_or_init(|| Schedule::new(cipher, &self.material))
            .key()
    }
}

/// The keys a process knows, by id.
#[derive(Debug, Default, Clone)]
pub struct Keyring {
    keys: BTreeMap<u32, Arc<Key>>,
}

impl Keyring {
    pub fn new(keys: impl IntoIterator<Item = Key>) -> Keyring {
        Keyring {
            keys: keys
                .into_iter()
                .map(|key| (key.id, Arc::new(key)))
                .collect(),
        }
    }

    pub fn get(&self, id: u32) -> Option<&Arc<Key>> {
        self.keys.get(&id)
    }

    pub fn ids(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }
}

/// Compression of a stream's frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    None,
    /// zstd at this level (1 to 19).
    Zstd { level: i32 },
}

/// Encryption of a stream's new segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncryptionConfig {
    pub cipher: Cipher,
    /// The key new segments are written with.
    pub key_id: u32,
}

fn seal(
    cipher: Cipher,
    key: &Key,
    nonce: &[u8; 12],
    aad: &[u8],
    body: &mut [u8],
) -> Result<[u8; TAG_LENGTH]> {
    let tag = key
        .schedule(cipher)
        .seal_in_place_separate_tag(
            ring::aead::Nonce::assume_unique_for_key(*nonce),
            ring::aead::Aad::from(aad),
            body,
        )
        .map_err(|_| Error::InvalidInput("encryption failed".to_string()))?;
    let mut bytes = [0u8; TAG_LENGTH];
    bytes.copy_from_slice(tag.as_ref());
    Ok(bytes)
}

/// Decrypts `body` in place; false when authentication fails.
fn open(
    cipher: Cipher,
    key: &Key,
    nonce: &[u8; 12],
    aad: &[u8],
    body: &mut [u8],
    tag: &[u8],
) -> bool {
    let Ok(tag) = ring::aead::Tag::try_from(tag) else {
        return false;
    };
    key.schedule(cipher)
        .open_in_place_separate_tag(
            ring::aead::Nonce::assume_unique_for_key(*nonce),
            ring::aead::Aad::from(aad),
            tag,
            body,
            0..,
        )
        .is_ok()
}

/// The writer's side: compresses and encrypts frames as they are built.
pub struct FrameEncoder {
    compression: Compression,
    encryption: Option<(Cipher, Arc<Key>)>,
    epoch: u32,
    counter: u64,
    scratch: Vec<u8>,
    plain_length: u32,
    compressed: bool,
    /// One zstd context for the stream's life (creating one per frame
    /// would cost more than compressing small frames).
    compressor: Option<zstd::bulk::Compressor<'static>>,
}

impl std::fmt::Debug for FrameEncoder {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("FrameEncoder")
            .field("compression", &self.compression)
            .field(
                "encryption",
                &self
                    .encryption
                    .as_ref()
                    .map(|(cipher, key)| (cipher, key.id)),
            )
            .finish()
    }
}

impl Drop for FrameEncoder {
    fn drop(&mut self) {
        self.scratch.zeroize();
    }
}

impl FrameEncoder {
    /// `epoch` must be one no earlier frame under any key of this stream
    /// used (the stream persists it).
    pub fn new(
        compression: Compression,
        encryption: Option<(Cipher, Arc<Key>)>,
        epoch: u32,
    ) -> FrameEncoder {
        let compressor = match compression {
            Compression::Zstd { level } => zstd::bulk::Compressor::new(level).ok(),
            Compression::None => None,
        };
        FrameEncoder {
            compression,
            encryption,
            epoch,
            counter: 0,
            scratch: Vec::new(),
            plain_length: 0,
            compressed: false,
            compressor,
        }
    }

    /// Key id and cipher new segments are written with (0 and none: plain).
    pub fn segment_key(&self) -> (u32, u8) {
        self.encryption
            .as_ref()
            .map_or((0, 0), |(cipher, key)| (key.id, cipher.id()))
    }

    /// Compresses the builder's body if that makes it smaller; returns the
    /// frame length the frame will have once finished.
    pub fn encode_body(&mut self, builder: &mut FrameBuilder) -> u64 {
        let plain = builder.buffer.len() - FRAME_HEADER_LENGTH;
        self.plain_length = plain as u32;
        self.compressed = false;
        if let Some(compressor) = &mut self.compressor {
            self.scratch.clear();
            self.scratch.reserve(zstd::zstd_safe::compress_bound(plain));
            let written = compressor
                .compress_to_buffer(&builder.buffer[FRAME_HEADER_LENGTH..], &mut self.scratch);
            if let Ok(length) = written {
                if length < plain {
                    builder.buffer.truncate(FRAME_HEADER_LENGTH);
                    builder.buffer.extend_from_slice(&self.scratch[..length]);
                    self.compressed = true;
                }
                if self.encryption.is_some() {
                    // The compressed plaintext must not outlive its
                    // encryption in this long-lived buffer.
                    let used = length.min(self.scratch.len());
                    self.scratch[..used].zeroize();
                }
            }
        }
        let tag = if self.encryption.is_some() {
            TAG_LENGTH
        } else {
            0
        };
        (builder.buffer.len() + tag) as u64
    }

    /// Fills the header, encrypts, and checksums the frame (after
    /// [`encode_body`](FrameEncoder::encode_body)).
    pub fn finish<'a>(
        &mut self,
        builder: &'a mut FrameBuilder,
        extra_flags: u16,
        durable_position: u64,
    ) -> Result<(&'a [u8], FrameHeader)> {
        let mut frame_flags = extra_flags;
        if self.compressed {
            frame_flags |= flags::COMPRESSION_ZSTD;
        }
        let mut header = builder.header;
        header.body_length_plain = self.plain_length;
        header.durable_position = durable_position;
        if let Some((cipher, key)) = &self.encryption {
            frame_flags |= flags::ENCRYPTED;
            self.counter += 1;
            let mut nonce = [0u8; 12];
            nonce[..4].copy_from_slice(&self.epoch.to_le_bytes());
            nonce[4..].copy_from_slice(&self.counter.to_le_bytes());
            header.nonce = nonce;
            header.flags = frame_flags;
            header.frame_length = (builder.buffer.len() + TAG_LENGTH) as u32;
            header.encode_fields(&mut builder.buffer[..FRAME_HEADER_LENGTH]);
            let (head, body) = builder.buffer.split_at_mut(FRAME_HEADER_LENGTH);
            let tag = seal(*cipher, key, &nonce, &head[8..], body)?;
            builder.buffer.extend_from_slice(&tag);
        } else {
            header.flags = frame_flags;
            header.frame_length = builder.buffer.len() as u32;
            header.encode_fields(&mut builder.buffer[..FRAME_HEADER_LENGTH]);
        }
        let crc = crc32c::crc32c(&builder.buffer[8..]);
        builder.buffer[4..8].copy_from_slice(&crc.to_le_bytes());
        builder.header = header;
        Ok((&builder.buffer, header))
    }
}

/// Owner of a decrypted body: zeroized when the last `Bytes` of it drops.
struct ZeroizingBody(Vec<u8>);

impl AsRef<[u8]> for ZeroizingBody {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for ZeroizingBody {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// Where a frame's segment says its key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SegmentKey {
    pub key_id: u32,
    pub cipher: u8,
}

/// The body of a checked frame after decryption (still compressed if it
/// was). Errors name what is wrong; they never yield other data.
fn open_body(
    header: &FrameHeader,
    frame: &Bytes,
    keyring: &Keyring,
    segment: SegmentKey,
) -> std::result::Result<Vec<u8>, String> {
    let end = header.frame_length as usize;
    if header.flags & flags::ENCRYPTED == 0 {
        return Ok(frame[FRAME_HEADER_LENGTH..end].to_vec());
    }
    if segment.key_id == 0 {
        return Err("frame is encrypted but its segment names no key".to_string());
    }
    let cipher = Cipher::from_id(segment.cipher)
        .ok_or_else(|| format!("unknown cipher id {}", segment.cipher))?;
    let key = keyring.get(segment.key_id).ok_or_else(|| {
        format!(
            "frame is encrypted with key id {}, which is not configured (configure the key to read it)",
            segment.key_id
        )
    })?;
    if end < FRAME_HEADER_LENGTH + TAG_LENGTH {
        return Err("encrypted frame is shorter than its tag".to_string());
    }
    let mut body = frame[FRAME_HEADER_LENGTH..end - TAG_LENGTH].to_vec();
    let tag = &frame[end - TAG_LENGTH..end];
    if !open(
        cipher,
        key,
        &header.nonce,
        &frame[8..FRAME_HEADER_LENGTH],
        &mut body,
        tag,
    ) {
        body.zeroize();
        return Err(format!(
            "frame failed authentication with key id {} (wrong key, or the frame or its header was altered)",
            segment.key_id
        ));
    }
    Ok(body)
}

/// The records of a checked frame, decrypting and decompressing as its
/// flags say. Errors name what is wrong; they never yield other data.
pub fn frame_records(
    header: &FrameHeader,
    frame: &Bytes,
    keyring: &Keyring,
    segment: SegmentKey,
) -> std::result::Result<RecordIter, String> {
    let transformed = header.flags & (flags::COMPRESSION_MASK | flags::ENCRYPTED) != 0;
    if !transformed {
        return Ok(header.plain_records(frame));
    }
    let mut body = open_body(header, frame, keyring, segment)?;
    if header.flags & flags::COMPRESSION_MASK == flags::COMPRESSION_ZSTD {
        let plain_length = header.body_length_plain as usize;
        // The plain length bounds the allocation; a frame cannot hold more
        // than a segment.
        if plain_length > u32::MAX as usize / 2 {
            return Err(format!("implausible plain body length {plain_length}"));
        }
        let decompressed =
            zstd::bulk::decompress(&body, plain_length).map_err(|error| format!("zstd: {error}"));
        body.zeroize();
        let decompressed = decompressed?;
        if decompressed.len() != plain_length {
            return Err(format!(
                "decompressed body is {} bytes, header says {plain_length}",
                decompressed.len()
            ));
        }
        body = decompressed;
    } else if body.len() != header.body_length_plain as usize {
        return Err(format!(
            "body is {} bytes, header says {}",
            body.len(),
            header.body_length_plain
        ));
    }
    let body = Bytes::from_owner(ZeroizingBody(body));
    Ok(RecordIter::new(
        body,
        header.base_offset,
        header.record_count,
    ))
}

/// An encrypted frame as a valid plain frame: the body decrypted but left
/// compressed if it was (nothing is recompressed), the tag dropped, the
/// encrypted flag and nonce cleared, the checksum recomputed.
pub fn decrypt_frame(
    header: &FrameHeader,
    frame: &Bytes,
    keyring: &Keyring,
    segment: SegmentKey,
) -> std::result::Result<(FrameHeader, Bytes), String> {
    let body = Zeroizing::new(open_body(header, frame, keyring, segment)?);
    let mut plain = *header;
    plain.flags &= !flags::ENCRYPTED;
    plain.nonce = [0; 12];
    plain.frame_length = (FRAME_HEADER_LENGTH + body.len()) as u32;
    let mut bytes = vec![0u8; FRAME_HEADER_LENGTH];
    plain.encode_fields(&mut bytes);
    bytes.extend_from_slice(&body);
    let crc = crc32c::crc32c(&bytes[8..]);
    bytes[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok((plain, Bytes::from_owner(ZeroizingBody(bytes))))
}

/// The nonce epoch of a stream: raised and persisted at every open, so
/// frame counters restart under a fresh epoch.
pub fn next_epoch(
    file_system: &dyn crate::io::FileSystem,
    directory: &Path,
    seen_in_log: u32,
) -> Result<u32> {
    let path = directory.join("nonce.epoch");
    let stored = file_system
        .read(&path)
        .ok()
        .filter(|bytes| {
            bytes.len() == 8
                && crc32c::crc32c(&bytes[..4])
                    == u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"))
        })
        .map(|bytes| u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")))
        .unwrap_or(0);
    let epoch = stored.max(seen_in_log).checked_add(1).ok_or_else(|| {
        Error::InvalidInput(format!(
            "nonce epoch of {} is exhausted; rotate to a new stream",
            directory.display()
        ))
    })?;
    let mut bytes = epoch.to_le_bytes().to_vec();
    bytes.extend_from_slice(&crc32c::crc32c(&epoch.to_le_bytes()).to_le_bytes());
    file_system.write_atomic(&path, &bytes)?;
    Ok(epoch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::frame::{check_frame, FrameCheck};
    use crate::format::record::Record;

    fn key(id: u32) -> Key {
        Key::new(id, [id as u8; KEY_LENGTH])
    }

    fn build(encoder: &mut FrameEncoder, payload: &str) -> Vec<u8> {
        let mut builder = FrameBuilder::new();
        builder.begin(10, 0, 0);
        for index in 0..20 {
            builder.push(&Record::new(format!("s.{index}"), payload.to_string()), 5);
        }
        encoder.encode_body(&mut builder);
        encoder.finish(&mut builder, 0, 64).unwrap().0.to_vec()
    }

    #[test]
    fn every_combination_round_trips() {
        let payload = "{\"event\":\"click\",\"user\":12345,\"page\":\"/home\"}".repeat(4);
        for compression in [Compression::None, Compression::Zstd { level: 1 }] {
            for cipher in [
                None,
                Some(Cipher::Aes256Gcm),
                Some(Cipher::ChaCha20Poly1305),
            ] {
                let keyring = Keyring::new([key(7)]);
                let encryption = cipher.map(|cipher| (cipher, Arc::clone(keyring.get(7).unwrap())));
                let mut encoder = FrameEncoder::new(compression, encryption, 3);
                let bytes = build(&mut encoder, &payload);
                let FrameCheck::Valid(header) = check_frame(&bytes) else {
                    panic!("valid frame")
                };
                let segment = SegmentKey {
                    key_id: if cipher.is_some() { 7 } else { 0 },
                    cipher: cipher.map_or(0, |cipher| cipher.id()),
                };
                let records: Vec<_> =
                    frame_records(&header, &Bytes::from(bytes.clone()), &keyring, segment)
                        .unwrap()
                        .collect::<std::result::Result<_, _>>()
                        .unwrap();
                assert_eq!(records.len(), 20);
                assert_eq!(records[3].payload, payload.as_bytes());
                if compression != Compression::None {
                    assert!(
                        bytes.len() < 20 * payload.len() / 2,
                        "JSON compresses: {} bytes",
                        bytes.len()
                    );
                }
                if cipher.is_some() {
                    assert!(
                        memchr::memmem::find(&bytes, b"click").is_none(),
                        "no plaintext on disk"
                    );
                    assert_eq!(&header.nonce[..4], &3u32.to_le_bytes());
                }
            }
        }
    }

    #[test]
    fn wrong_key_missing_key_and_tampering_are_errors_not_data() {
        let keyring = Keyring::new([key(1)]);
        let mut encoder = FrameEncoder::new(
            Compression::None,
            Some((Cipher::Aes256Gcm, Arc::clone(keyring.get(1).unwrap()))),
            1,
        );
        let bytes = build(&mut encoder, "secret");
        let FrameCheck::Valid(header) = check_frame(&bytes) else {
            panic!()
        };
        let segment = SegmentKey {
            key_id: 1,
            cipher: 1,
        };
        let wrong = Keyring::new([Key::new(1, [9; KEY_LENGTH])]);
        let error = frame_records(&header, &Bytes::from(bytes.clone()), &wrong, segment)
            .err()
            .unwrap();
        assert!(error.contains("authentication"), "{error}");
        let missing = frame_records(
            &header,
            &Bytes::from(bytes.clone()),
            &Keyring::default(),
            segment,
        )
        .err()
        .unwrap();
        assert!(
            missing.contains("key id 1") && missing.contains("not configured"),
            "{missing}"
        );
        // Alter the header's base offset and fix the CRC: the AEAD notices.
        let mut altered = bytes.clone();
        altered[16] ^= 1;
        let crc = crc32c::crc32c(&altered[8..]);
        altered[4..8].copy_from_slice(&crc.to_le_bytes());
        let FrameCheck::Valid(altered_header) = check_frame(&altered) else {
            panic!()
        };
        assert!(frame_records(&altered_header, &Bytes::from(altered), &keyring, segment).is_err());
    }

    #[test]
    fn keys_never_print_and_parse_from_hex() {
        let text = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let key = Key::parse(4, text, "test").unwrap();
        let shown = format!("{key:?}");
        assert!(
            !shown.contains("0011") && shown.contains("redacted"),
            "{shown}"
        );
        assert!(Key::parse(4, "abc", "test").is_err());
    }
}
