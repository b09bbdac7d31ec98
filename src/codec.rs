//! Frame body transforms: zstd compression and AEAD encryption at rest, per
//! batch frame (docs/FORMAT.md 2.2).
//!
//! Writing: the plain body is compressed if that makes it smaller (the frame
//! flags say which), then encrypted with the stream's key; the AEAD's
//! associated data is the frame header (bytes 8..96, checksums zero), so a
//! changed header fails authentication as surely as a changed body. The key
//! id and cipher are in the frame header, and nothing local to one segment
//! file is authenticated, so a follower stores a leader's encrypted frame
//! byte for byte, without its key. Reading reverses the steps.
//!
//! Nonces are 96 bits: the 16-bit node id of the writer, a 32-bit epoch
//! that the stream's metadata persists and raises before the first write of
//! every open and every truncation (starting from a random value), then a
//! 48-bit frame counter. A nonce therefore never repeats under a key: not
//! across restarts, not after a suffix is truncated and rewritten, not
//! across replicas that share the key.
//!
//! Key material lives in [`Key`]s that zeroize on drop and never print; the
//! buffers that hold decrypted bodies are zeroized when the last record
//! borrowing them is dropped.

use crate::error::{Error, Result};
use crate::format::frame::{flags, FrameBuilder, FrameHeader, FrameKind, FRAME_HEADER_LENGTH};
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

/// The writer's side: compresses and encrypts frame bodies.
pub struct FrameEncoder {
    compression: Compression,
    encryption: Option<(Cipher, Arc<Key>)>,
    node_id: u16,
    epoch: u32,
    counter: u64,
    /// The plain body in one buffer (compression and encryption need it).
    plain: Vec<u8>,
    /// The stored body when it is not the builder's.
    stored: Vec<u8>,
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
        self.plain.zeroize();
    }
}

/// Largest frame counter of one nonce epoch (48 bits).
const COUNTER_MAX: u64 = (1 << 48) - 1;

/// The body of an encoded frame: the builder's parts, or one buffer.
pub enum EncodedBody<'a> {
    Parts(&'a FrameBuilder),
    Bytes(&'a [u8]),
}

/// A frame ready to write: its header (checksums filled in) and body.
pub struct EncodedFrame<'a> {
    pub header: FrameHeader,
    pub header_bytes: [u8; FRAME_HEADER_LENGTH],
    pub body: EncodedBody<'a>,
}

impl EncodedFrame<'_> {
    /// The body's parts in order.
    pub fn body_parts(&self) -> Vec<&[u8]> {
        match &self.body {
            EncodedBody::Parts(builder) => builder.body_parts().collect(),
            EncodedBody::Bytes(bytes) => vec![bytes],
        }
    }
}

impl FrameEncoder {
    /// Nonces are `node_id`, then `epoch`, then a frame counter: the epoch
    /// must be one no earlier frame of this node under any key of this
    /// stream used (the stream's metadata persists it).
    pub fn new(
        compression: Compression,
        encryption: Option<(Cipher, Arc<Key>)>,
        node_id: u16,
        epoch: u32,
    ) -> FrameEncoder {
        let compressor = match compression {
            Compression::Zstd { level } => zstd::bulk::Compressor::new(level).ok(),
            Compression::None => None,
        };
        FrameEncoder {
            compression,
            encryption,
            node_id,
            epoch,
            counter: 0,
            plain: Vec::new(),
            stored: Vec::new(),
            compressor,
        }
    }

    /// Starts a new nonce epoch (the frame counter restarts).
    pub fn set_epoch(&mut self, epoch: u32) {
        self.epoch = epoch;
        self.counter = 0;
    }

    /// Key id and cipher new segments are written with (0 and none: plain).
    pub fn segment_key(&self) -> (u32, u8) {
        self.encryption
            .as_ref()
            .map_or((0, 0), |(cipher, key)| (key.id, cipher.id()))
    }

    /// The stored length the frame built in `builder` will have.
    pub fn is_transforming(&self) -> bool {
        self.compressor.is_some() || self.encryption.is_some()
    }

    /// Encodes the body of `builder` (compressed if that makes it smaller,
    /// then encrypted) and completes `header` (its base offset, counts,
    /// timestamps, Raft id and atomic flag are the caller's).
    pub fn encode<'a>(
        &'a mut self,
        builder: &'a mut FrameBuilder,
        mut header: FrameHeader,
    ) -> Result<EncodedFrame<'a>> {
        let (plain_length, plain_crc) = builder.seal();
        header.body_length_plain = u32::try_from(plain_length)
            .map_err(|_| Error::InvalidInput(format!("frame body of {plain_length} bytes")))?;
        if !self.is_transforming() {
            header.frame_length = (FRAME_HEADER_LENGTH + plain_length) as u32;
            header.body_crc = plain_crc;
            return Ok(EncodedFrame {
                header_bytes: header.encode(),
                header,
                body: EncodedBody::Parts(builder),
            });
        }
        builder.body_contiguous(&mut self.plain);
        self.stored.clear();
        let mut compressed = false;
        if let Some(compressor) = &mut self.compressor {
            self.stored
                .reserve(zstd::zstd_safe::compress_bound(plain_length));
            if let Ok(length) = compressor.compress_to_buffer(&self.plain, &mut self.stored) {
                compressed = length < plain_length;
            }
        }
        if compressed {
            header.flags |= flags::COMPRESSION_ZSTD;
        } else {
            self.stored.clear();
            self.stored.extend_from_slice(&self.plain);
        }
        if self.encryption.is_some() {
            // The plaintext must not outlive its encryption in a buffer
            // that lives as long as the stream.
            self.plain.zeroize();
        }
        if let Some((cipher, key)) = &self.encryption {
            if self.counter >= COUNTER_MAX {
                return Err(Error::InvalidInput(
                    "nonce counter of this epoch is exhausted; reopen the stream".to_string(),
                ));
            }
            self.counter += 1;
            let mut nonce = [0u8; 12];
            nonce[..2].copy_from_slice(&self.node_id.to_le_bytes());
            nonce[2..6].copy_from_slice(&self.epoch.to_le_bytes());
            nonce[6..].copy_from_slice(&self.counter.to_le_bytes()[..6]);
            header.flags |= flags::ENCRYPTED;
            header.cipher = cipher.id();
            header.key_id = key.id;
            header.nonce = nonce;
            header.frame_length = (FRAME_HEADER_LENGTH + self.stored.len() + TAG_LENGTH) as u32;
            let associated = header.encode_associated_data();
            let tag = seal(*cipher, key, &nonce, &associated[8..], &mut self.stored)?;
            self.stored.extend_from_slice(&tag);
        } else {
            header.frame_length = (FRAME_HEADER_LENGTH + self.stored.len()) as u32;
        }
        header.body_crc = crc32c::crc32c(&self.stored);
        Ok(EncodedFrame {
            header_bytes: header.encode(),
            header,
            body: EncodedBody::Bytes(&self.stored),
        })
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

/// The body of a checked frame after decryption (still compressed if it
/// was). Errors name what is wrong; they never yield other data.
fn open_body(
    header: &FrameHeader,
    frame: &Bytes,
    keyring: &Keyring,
) -> std::result::Result<Vec<u8>, String> {
    let end = header.frame_length as usize;
    if !header.is_encrypted() {
        return Ok(frame[FRAME_HEADER_LENGTH..end].to_vec());
    }
    let cipher = Cipher::from_id(header.cipher)
        .ok_or_else(|| format!("unknown cipher id {}", header.cipher))?;
    let key = keyring.get(header.key_id).ok_or_else(|| {
        format!(
            "frame is encrypted with key id {}, which is not configured (configure the key to read it)",
            header.key_id
        )
    })?;
    if end < FRAME_HEADER_LENGTH + TAG_LENGTH {
        return Err("encrypted frame is shorter than its tag".to_string());
    }
    let mut body = frame[FRAME_HEADER_LENGTH..end - TAG_LENGTH].to_vec();
    let tag = &frame[end - TAG_LENGTH..end];
    let associated = header.encode_associated_data();
    if !open(cipher, key, &header.nonce, &associated[8..], &mut body, tag) {
        body.zeroize();
        return Err(format!(
            "frame failed authentication with key id {} (wrong key, or the frame or its header was altered)",
            header.key_id
        ));
    }
    Ok(body)
}

/// The records of a checked frame, decrypting and decompressing as its
/// flags say. The plain body may not exceed `plain_bytes_max` (what the
/// frame's records can hold under the stream's limits), so a damaged or
/// forged length cannot make this allocate more. Errors name what is
/// wrong; they never yield other data.
pub fn frame_records(
    header: &FrameHeader,
    frame: &Bytes,
    keyring: &Keyring,
    plain_bytes_max: usize,
) -> std::result::Result<RecordIter, String> {
    if header.kind != FrameKind::Records {
        return Ok(RecordIter::new(Bytes::new(), header.base_offset, 0));
    }
    if !header.is_compressed() && !header.is_encrypted() {
        return Ok(header.plain_records(frame));
    }
    let plain_length = header.body_length_plain as usize;
    if plain_length > plain_bytes_max {
        return Err(format!(
            "frame claims a plain body of {plain_length} bytes, which exceeds the limit of {plain_bytes_max} (what its {} records can hold)",
            header.record_count
        ));
    }
    let mut body = open_body(header, frame, keyring)?;
    if header.flags & flags::COMPRESSION_MASK == flags::COMPRESSION_ZSTD {
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
    } else if body.len() != plain_length {
        return Err(format!(
            "body is {} bytes, header says {plain_length}",
            body.len()
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
/// encrypted flag, key and nonce cleared, the checksums recomputed.
pub fn decrypt_frame(
    header: &FrameHeader,
    frame: &Bytes,
    keyring: &Keyring,
) -> std::result::Result<(FrameHeader, Bytes), String> {
    let body = Zeroizing::new(open_body(header, frame, keyring)?);
    let mut plain = *header;
    plain.flags &= !flags::ENCRYPTED;
    plain.nonce = [0; 12];
    plain.key_id = 0;
    plain.cipher = 0;
    plain.frame_length = (FRAME_HEADER_LENGTH + body.len()) as u32;
    plain.body_crc = crc32c::crc32c(&body);
    let mut bytes = plain.encode().to_vec();
    bytes.extend_from_slice(&body);
    Ok((plain, Bytes::from_owner(ZeroizingBody(bytes))))
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
        builder.begin();
        for index in 0..20 {
            builder.push(&Record::new(format!("s.{index}"), payload.to_string()), 5);
        }
        let header = FrameHeader {
            base_offset: 10,
            record_count: builder.record_count(),
            first_timestamp_ns: 5,
            last_timestamp_ns: 5,
            ..FrameHeader::default()
        };
        let frame = encoder.encode(&mut builder, header).unwrap();
        let mut bytes = frame.header_bytes.to_vec();
        for part in frame.body_parts() {
            bytes.extend_from_slice(part);
        }
        bytes
    }

    const PLAIN_MAX: usize = 1 << 20;

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
                let mut encoder = FrameEncoder::new(compression, encryption, 9, 3);
                let bytes = build(&mut encoder, &payload);
                let FrameCheck::Valid(header) = check_frame(&bytes) else {
                    panic!("valid frame: {:?}", check_frame(&bytes))
                };
                let records: Vec<_> =
                    frame_records(&header, &Bytes::from(bytes.clone()), &keyring, PLAIN_MAX)
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
                    assert_eq!(&header.nonce[..2], &9u16.to_le_bytes(), "node id first");
                    assert_eq!(&header.nonce[2..6], &3u32.to_le_bytes(), "then the epoch");
                    assert_eq!(header.key_id, 7);
                }
            }
        }
    }

    #[test]
    fn nonces_of_two_nodes_with_one_key_never_meet() {
        let keyring = Keyring::new([key(1)]);
        let encryption = || Some((Cipher::Aes256Gcm, Arc::clone(keyring.get(1).unwrap())));
        let mut first = FrameEncoder::new(Compression::None, encryption(), 1, 5);
        let mut second = FrameEncoder::new(Compression::None, encryption(), 2, 5);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            for encoder in [&mut first, &mut second] {
                let bytes = build(encoder, "x");
                let FrameCheck::Valid(header) = check_frame(&bytes) else {
                    panic!()
                };
                assert!(seen.insert(header.nonce), "nonce repeated");
            }
        }
    }

    #[test]
    fn wrong_key_missing_key_tampering_and_huge_plain_lengths_are_errors_not_data() {
        let keyring = Keyring::new([key(1)]);
        let mut encoder = FrameEncoder::new(
            Compression::None,
            Some((Cipher::Aes256Gcm, Arc::clone(keyring.get(1).unwrap()))),
            0,
            1,
        );
        let bytes = build(&mut encoder, "secret");
        let FrameCheck::Valid(header) = check_frame(&bytes) else {
            panic!()
        };
        let wrong = Keyring::new([Key::new(1, [9; KEY_LENGTH])]);
        let error = frame_records(&header, &Bytes::from(bytes.clone()), &wrong, PLAIN_MAX)
            .err()
            .unwrap();
        assert!(error.contains("authentication"), "{error}");
        let missing = frame_records(
            &header,
            &Bytes::from(bytes.clone()),
            &Keyring::default(),
            PLAIN_MAX,
        )
        .err()
        .unwrap();
        assert!(
            missing.contains("key id 1") && missing.contains("not configured"),
            "{missing}"
        );
        let bounded = frame_records(&header, &Bytes::from(bytes.clone()), &keyring, 10)
            .err()
            .unwrap();
        assert!(bounded.contains("exceeds the limit"), "{bounded}");
        // Alter the header's base offset and fix its checksum: the AEAD
        // notices.
        let mut altered = bytes.clone();
        altered[16] ^= 1;
        let crc = crc32c::crc32c(&altered[8..96]);
        altered[4..8].copy_from_slice(&crc.to_le_bytes());
        let FrameCheck::Valid(altered_header) = check_frame(&altered) else {
            panic!()
        };
        assert!(
            frame_records(&altered_header, &Bytes::from(altered), &keyring, PLAIN_MAX).is_err()
        );
    }

    #[test]
    fn decrypted_frames_are_valid_plain_frames() {
        let keyring = Keyring::new([key(1)]);
        let mut encoder = FrameEncoder::new(
            Compression::Zstd { level: 1 },
            Some((
                Cipher::ChaCha20Poly1305,
                Arc::clone(keyring.get(1).unwrap()),
            )),
            0,
            1,
        );
        let bytes = Bytes::from(build(&mut encoder, &"abc".repeat(100)));
        let FrameCheck::Valid(header) = check_frame(&bytes) else {
            panic!()
        };
        let (plain, plain_bytes) = decrypt_frame(&header, &bytes, &keyring).unwrap();
        assert_eq!(check_frame(&plain_bytes), FrameCheck::Valid(plain));
        assert!(plain.is_compressed() && !plain.is_encrypted());
        let records: Vec<_> = frame_records(&plain, &plain_bytes, &Keyring::default(), PLAIN_MAX)
            .unwrap()
            .collect::<std::result::Result<_, _>>()
            .unwrap();
        assert_eq!(records.len(), 20);
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
