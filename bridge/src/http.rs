//! The operations endpoint: `/metrics` (Prometheus), `/healthz` (the process
//! serves), `/readyz` (streams open, NATS connected, subscriptions active,
//! no stream read-only). A deliberately small HTTP/1.1 responder: one
//! request per connection, GET only, bounded request size.

use crate::metrics::BridgeMetrics;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

const REQUEST_BYTES_MAX: usize = 8 * 1024;

/// What `/readyz` reports.
#[derive(Debug, Default)]
pub struct Readiness {
    pub serving: AtomicBool,
}

pub async fn bind(listen: &str) -> crate::error::Result<TcpListener> {
    TcpListener::bind(listen).await.map_err(|error| {
        crate::error::BridgeError::io(
            format!("cannot listen for HTTP on {listen} (http.listen)"),
            error,
        )
    })
}

pub async fn run(
    listener: TcpListener,
    metrics: Arc<BridgeMetrics>,
    readiness: Arc<Readiness>,
    streams: Arc<std::collections::BTreeMap<String, Arc<natswal::Stream>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (mut socket, _) = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "HTTP accept failed");
                    continue;
                }
            },
        };
        let metrics = Arc::clone(&metrics);
        let readiness = Arc::clone(&readiness);
        let streams = Arc::clone(&streams);
        tokio::spawn(async move {
            let mut request = Vec::with_capacity(512);
            let mut buffer = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while !request.windows(4).any(|window| window == b"\r\n\r\n")
                    && request.len() < REQUEST_BYTES_MAX
                {
                    let count = socket.read(&mut buffer).await?;
                    if count == 0 {
                        break;
                    }
                    request.extend_from_slice(&buffer[..count]);
                }
                Ok::<(), std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let line = String::from_utf8_lossy(
                request
                    .split(|byte| *byte == b'\r')
                    .next()
                    .unwrap_or_default(),
            )
            .to_string();
            let mut parts = line.split_whitespace();
            let (method, path) = (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
            );
            let (status, content_type, body) = if method != "GET" {
                (
                    "405 Method Not Allowed",
                    "text/plain",
                    "only GET is served\n".to_string(),
                )
            } else {
                match path {
                    "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
                    "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
                    "/readyz" => ready(&metrics, &readiness, &streams),
                    _ => (
                        "404 Not Found",
                        "text/plain",
                        "try /metrics, /healthz or /readyz\n".to_string(),
                    ),
                }
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}

fn ready(
    metrics: &BridgeMetrics,
    readiness: &Readiness,
    streams: &std::collections::BTreeMap<String, Arc<natswal::Stream>>,
) -> (&'static str, &'static str, String) {
    let mut problems = Vec::new();
    if !readiness.serving.load(Ordering::Acquire) {
        problems.push("not serving yet (starting or shutting down)".to_string());
    }
    for role in metrics.nats_connections_down() {
        problems.push(format!("the {role} connection to NATS is down"));
    }
    for stream in streams.values() {
        let status = stream.status();
        if let Some(cause) = status.poisoned {
            problems.push(format!("stream '{}' is read-only: {cause}", stream.name()));
        } else if let Some(cause) = status.append_failure {
            problems.push(format!(
                "stream '{}' cannot take writes: {cause}",
                stream.name()
            ));
        }
    }
    if problems.is_empty() {
        ("200 OK", "text/plain", "ready\n".to_string())
    } else {
        (
            "503 Service Unavailable",
            "text/plain",
            format!("{}\n", problems.join("\n")),
        )
    }
}
