//! The compression and encryption case of `natswal bench wal`.
//!
//! Payloads are generated JSON events of 200 B to 2 KiB (ids, timestamps,
//! users, line items: the repetitive-but-not-trivial text real event streams
//! carry). Every round measures plain `fsync` and each codec on the same
//! backend one after another, so each codec's figure is a ratio to the plain
//! peer of its own round; the report averages those ratios.

use super::wal::{
    close, fresh_directory, open_stream_with, run_producers, stream_config, Throughput,
    WalBenchArgs,
};
use bytes::Bytes;
use natswal::io::WriteMode;
use natswal::{Cipher, Compression, Durability, EncryptionConfig, Key, Keyring, StreamOptions};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

/// Smallest and largest generated event, in bytes.
const EVENT_BYTES_MIN: usize = 200;
const EVENT_BYTES_MAX: usize = 2048;
/// Distinct events producers cycle through.
const EVENT_COUNT: usize = 20_000;

/// xorshift64*: deterministic, so every run stores the same mix.
struct Generator(u64);

impl Generator {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    fn pick<'a>(&mut self, choices: &[&'a str]) -> &'a str {
        choices[self.below(choices.len() as u64) as usize]
    }

    fn hex(&mut self, digits: usize) -> String {
        let mut text = String::with_capacity(digits);
        while text.len() < digits {
            let _ = write!(text, "{:016x}", self.next());
        }
        text.truncate(digits);
        text
    }
}

const EVENT_TYPES: &[&str] = &[
    "order.created",
    "order.paid",
    "order.cancelled",
    "cart.updated",
    "shipment.dispatched",
    "user.login",
    "payment.refunded",
];
const SERVICES: &[&str] = &["checkout", "catalog", "payments", "shipping", "identity"];
const COUNTRIES: &[&str] = &["DE", "FR", "US", "GB", "NL", "SE", "JP", "BR", "IN", "ES"];
const PLANS: &[&str] = &["free", "pro", "team", "enterprise"];
const NAMES: &[&str] = &[
    "anna", "ben", "chen", "dmitri", "eva", "farah", "goran", "hana", "ivan", "julia",
];
const ADJECTIVES: &[&str] = &["red", "large", "organic", "wireless", "vintage", "compact"];
const NOUNS: &[&str] = &[
    "mug", "lamp", "jacket", "speaker", "backpack", "notebook", "kettle",
];
const AGENTS: &[&str] = &[
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "okhttp/4.12.0",
];

/// One JSON event of about `target` bytes (within the min/max bounds).
fn event(generator: &mut Generator, index: usize, target: usize) -> String {
    let mut fields = vec![
        format!("\"id\":\"evt_{}\"", generator.hex(20)),
        format!("\"type\":\"{}\"", generator.pick(EVENT_TYPES)),
        format!(
            "\"ts\":\"2026-11-24T{:02}:{:02}:{:02}.{:03}Z\"",
            generator.below(24),
            generator.below(60),
            generator.below(60),
            generator.below(1000)
        ),
        format!(
            "\"source\":\"{}-{}\"",
            generator.pick(SERVICES),
            generator.below(12)
        ),
    ];
    let name = generator.pick(NAMES);
    let optional = [
        format!(
            "\"user\":{{\"id\":{},\"email\":\"{name}{}@example.com\",\"country\":\"{}\",\"plan\":\"{}\"}}",
            100_000 + generator.below(900_000),
            generator.below(1000),
            generator.pick(COUNTRIES),
            generator.pick(PLANS)
        ),
        format!("\"session\":\"{}\"", generator.hex(32)),
        format!(
            "\"ip\":\"10.{}.{}.{}\"",
            generator.below(256),
            generator.below(256),
            generator.below(256)
        ),
        format!("\"agent\":\"{}\"", generator.pick(AGENTS)),
        format!("\"sequence\":{index}"),
    ];
    // Braces, fields and the commas between them.
    let mut length = fields.iter().map(|field| field.len() + 1).sum::<usize>() + 1;
    for field in optional {
        if length + field.len() + 1 > target && length >= EVENT_BYTES_MIN {
            break;
        }
        length += field.len() + 1;
        fields.push(field);
    }
    let mut items = Vec::new();
    let mut total_cents = 0u64;
    loop {
        let quantity = 1 + generator.below(5);
        let price_cents = 199 + generator.below(20_000);
        let item = format!(
            "{{\"sku\":\"SKU-{:05}\",\"name\":\"{} {}\",\"quantity\":{quantity},\"unit_price_cents\":{price_cents},\"currency\":\"EUR\"}}",
            generator.below(100_000),
            generator.pick(ADJECTIVES),
            generator.pick(NOUNS)
        );
        // "items":[...] and "total_cents":N add about 40 bytes.
        if length + item.len() + 41 > target.min(EVENT_BYTES_MAX) {
            break;
        }
        length += item.len() + 1;
        total_cents += quantity * price_cents;
        items.push(item);
    }
    if !items.is_empty() {
        fields.push(format!("\"items\":[{}]", items.join(",")));
        fields.push(format!("\"total_cents\":{total_cents}"));
    }
    let mut text = format!("{{{}}}", fields.join(","));
    if text.len() < EVENT_BYTES_MIN {
        // Short events get a free-text note up to the minimum size.
        text.pop();
        text.push_str(",\"note\":\"");
        while text.len() + 2 < EVENT_BYTES_MIN {
            text.push_str(generator.pick(NOUNS));
            text.push(' ');
        }
        text.push_str("\"}");
    }
    text
}

/// The event mix: sizes spread evenly over 200 B to 2 KiB.
fn events() -> Vec<Bytes> {
    let mut generator = Generator(0x9e37_79b9_7f4a_7c15);
    (0..EVENT_COUNT)
        .map(|index| {
            let span = (EVENT_BYTES_MAX - EVENT_BYTES_MIN) as u64;
            let target = EVENT_BYTES_MIN + generator.below(span + 1) as usize;
            let text = event(&mut generator, index, target);
            debug_assert!(
                text.len() <= EVENT_BYTES_MAX,
                "event of {} bytes",
                text.len()
            );
            Bytes::from(text)
        })
        .collect()
}

#[derive(Debug, Clone, Copy)]
struct Codec {
    name: &'static str,
    compression: Compression,
    cipher: Option<Cipher>,
}

const CODECS: &[Codec] = &[
    Codec {
        name: "plain",
        compression: Compression::None,
        cipher: None,
    },
    Codec {
        name: "zstd 1",
        compression: Compression::Zstd { level: 1 },
        cipher: None,
    },
    Codec {
        name: "zstd 3",
        compression: Compression::Zstd { level: 3 },
        cipher: None,
    },
    Codec {
        name: "aes-256-gcm",
        compression: Compression::None,
        cipher: Some(Cipher::Aes256Gcm),
    },
    Codec {
        name: "chacha20-poly1305",
        compression: Compression::None,
        cipher: Some(Cipher::ChaCha20Poly1305),
    },
    Codec {
        name: "zstd 1 + aes-256-gcm",
        compression: Compression::Zstd { level: 1 },
        cipher: Some(Cipher::Aes256Gcm),
    },
];

async fn measure(
    args: &WalBenchArgs,
    codec: Codec,
    payloads: &Arc<Vec<Bytes>>,
    write_mode: WriteMode,
) -> Throughput {
    let directory = fresh_directory(&args.dir, "codec");
    let mut config = stream_config(Durability::Fsync);
    config.compression = codec.compression;
    config.encryption = codec
        .cipher
        .map(|cipher| EncryptionConfig { cipher, key_id: 1 });
    // A fixed bench key: nothing secret is stored.
    let keyring = Keyring::new([Key::new(1, [0x42; 32])]);
    let options = StreamOptions {
        config,
        keyring: Arc::new(keyring),
        ..StreamOptions::default()
    };
    let stream = Arc::new(open_stream_with(&directory, write_mode, options));
    let result = run_producers(
        Arc::clone(&stream),
        Arc::clone(payloads),
        args,
        Duration::from_secs_f64(args.seconds),
    )
    .await;
    close(stream).await;
    let _ = std::fs::remove_dir_all(&directory);
    result
}

/// Measures every codec against plain `fsync`, `codec_rounds` times.
pub async fn codec_case(args: &WalBenchArgs) {
    let payloads = Arc::new(events());
    let payload_bytes: usize = payloads.iter().map(Bytes::len).sum();
    let smallest = payloads.iter().map(Bytes::len).min().unwrap_or(0);
    let largest = payloads.iter().map(Bytes::len).max().unwrap_or(0);
    let write_mode = WriteMode::default();
    let rounds = args.codec_rounds.max(1);
    // Per codec: sum of msgs/s, of MB/s, of throughput ratio to the round's
    // plain case, of log bytes per payload byte.
    let mut sums = vec![[0.0f64; 4]; CODECS.len()];
    for _ in 0..rounds {
        let mut plain_rate = None;
        for (index, codec) in CODECS.iter().enumerate() {
            let result = measure(args, *codec, &payloads, write_mode).await;
            let rate = result.messages_per_second();
            let plain = *plain_rate.get_or_insert(rate);
            sums[index][0] += rate;
            sums[index][1] += result.megabytes_per_second();
            sums[index][2] += rate / plain;
            sums[index][3] += result.log_bytes as f64 / result.payload_bytes.max(1) as f64;
        }
    }
    let rounds = rounds as f64;
    let plain_disk = sums[0][3] / rounds;
    println!();
    println!("## Compression and encryption (JSON events, fsync, {write_mode})");
    println!();
    println!(
        "{} distinct events of {smallest} to {largest} B (mean {:.0} B); {} round(s) of {:.1} s per codec; ratios are to plain fsync in the same round, averaged.",
        payloads.len(),
        payload_bytes as f64 / payloads.len() as f64,
        rounds,
        args.seconds
    );
    println!();
    println!("| codec | msgs/s | payload MB/s | throughput vs plain | log bytes per payload byte | bytes on disk vs plain |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (index, codec) in CODECS.iter().enumerate() {
        let [rate, megabytes, ratio, disk] = sums[index].map(|sum| sum / rounds);
        println!(
            "| {} | {rate:.0} | {megabytes:.1} | {ratio:.2} | {disk:.3} | {:.2}x smaller |",
            codec.name,
            plain_disk / disk
        );
    }
    println!();
    println!("Targets: encryption keeps >= 0.85 of plain throughput; zstd 1 keeps >= 0.70 and stores >= 2x fewer bytes.");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_json_within_the_size_bounds() {
        let events = events();
        assert_eq!(events.len(), EVENT_COUNT);
        for event in &events {
            assert!(
                (EVENT_BYTES_MIN..=EVENT_BYTES_MAX).contains(&event.len()),
                "event of {} bytes",
                event.len()
            );
            let value: serde_json::Value = serde_json::from_slice(event).expect("valid JSON");
            assert!(value["id"].as_str().unwrap().starts_with("evt_"));
        }
        // The mix covers the range, not one size.
        let small = events.iter().filter(|event| event.len() < 500).count();
        let large = events.iter().filter(|event| event.len() > 1700).count();
        assert!(
            small > EVENT_COUNT / 10 && large > EVENT_COUNT / 10,
            "{small} small, {large} large"
        );
    }
}
