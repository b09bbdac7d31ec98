//! natswal's own NATS client for the ingest connection: the protocol
//! ([`protocol`]), opening and authenticating a connection ([`connect`]),
//! and the client that keeps one connection up, with subscriptions and
//! publishing ([`client`]).
//!
//! Why not async-nats here: ingest is natswal's hottest path, and
//! async-nats parses each message into a `HeaderMap` (a hash map: the
//! header order the publisher sent is lost) and passes every message and
//! every publish through its own command channel. This client hands ingest
//! the wire bytes as slices of its read buffer: a stored record keeps its
//! header block exactly as received, and nothing per message is copied or
//! allocated before the frame builder. The replay API and the command line
//! keep async-nats, whose request/response and reconnect handling they use.
//!
//! What it supports is what `[nats]` configures: several servers with
//! failover, user and password (also in the URL), token, nkey seed, `.creds`
//! (JWT plus a signed nonce), TLS with a custom CA and client certificates
//! (`tls://` or `nats.tls.required` refuse a server without it). It does not
//! follow cluster topology updates (`connect_urls`): list every server.

pub mod client;
pub mod connect;
pub mod protocol;

/// The end-to-end tests' support (a real nats-server on a free port).
#[cfg(test)]
#[path = "../../tests/support/nats_server.rs"]
#[allow(dead_code)]
mod test_support;

pub use client::{Client, Event, Message, Options, PublishError, Subscription};
pub use connect::{Credentials, ServerAddress, TlsOptions};
pub use protocol::Dialect;
