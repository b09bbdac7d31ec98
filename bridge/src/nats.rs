//! The NATS connections from `[nats]`: server list, credentials, TLS
//! (custom CA, client certificates). The server's connections use
//! natswal's own client ([`connect_wire`]), whose events feed the metrics
//! and `/readyz`; the command line tools use async-nats ([`connect`]),
//! whose events are only logged.

use crate::config::NatsConfig;
use crate::error::{BridgeError, Result};
use crate::metrics::BridgeMetrics;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Connects async-nats with everything in `[nats]` (the command line
/// tools). Fails with a clear error when the servers cannot be reached in
/// `connect_timeout` or refuse the credentials.
pub async fn connect(config: &NatsConfig, role: &str) -> Result<async_nats::Client> {
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("{}-{role}", config.name))
        .subscription_capacity(config.subscription_capacity)
        // Room for many outgoing acks and replayed records between writes.
        .client_capacity(64 * 1024)
        .connection_timeout(config.connect_timeout)
        .max_reconnects(None);
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &config.token {
        options = options.token(token.clone());
    }
    if let Some(path) = &config.nkey_seed_file {
        let seed = read_secret(path, "nkey seed")?;
        options = options.nkey(seed.trim().to_string());
    }
    if let Some(path) = &config.creds_file {
        options = options.credentials_file(path).await.map_err(|error| {
            BridgeError::io(format!("cannot read creds file {}", path.display()), error)
        })?;
    }
    if let Some(tls) = &config.tls {
        check_tls_files(tls)?;
        options = options.require_tls(tls.required);
        if let Some(ca) = &tls.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
    }
    let role_name = role.to_string();
    options = options.event_callback(move |event| {
        let role = role_name.clone();
        async move {
            match event {
                async_nats::Event::SlowConsumer(subscription) => {
                    tracing::warn!(
                        role,
                        subscription,
                        "NATS dropped messages for a slow consumer: this reader could not keep up"
                    );
                }
                async_nats::Event::Disconnected => {
                    tracing::warn!(role, "disconnected from NATS; reconnecting");
                }
                other => tracing::info!(role, event = %other, "NATS event"),
            }
        }
    });
    let servers: Vec<async_nats::ServerAddr> = config
        .servers
        .iter()
        .map(|server| {
            server.parse().map_err(|error| BridgeError::Config {
                key: "nats.servers".to_string(),
                reason: format!("'{server}': {error}"),
            })
        })
        .collect::<Result<_>>()?;
    options.connect(servers).await.map_err(|error| {
        BridgeError::nats(
            format!("cannot connect to {}", config.servers.join(", ")),
            describe_connect_error(&error),
        )
    })
}

fn describe_connect_error(error: &async_nats::ConnectError) -> String {
    use async_nats::ConnectErrorKind;
    match error.kind() {
        ConnectErrorKind::AuthorizationViolation => {
            "authorization violation: the server refused natswal's credentials (check nats.user/password, token, nkey or creds)".to_string()
        }
        ConnectErrorKind::Authentication => format!("authentication failed: {error}"),
        ConnectErrorKind::Tls => format!("TLS failed: {error} (check nats.tls.ca_file and the server certificate)"),
        ConnectErrorKind::TimedOut => format!("timed out: {error} (is nats-server running and reachable?)"),
        _ => error.to_string(),
    }
}

/// Connects natswal's own client ([`crate::wire`]) with everything in
/// `[nats]`: the server's ingest and api connections. Same errors as
/// [`connect`].
pub async fn connect_wire(
    config: &NatsConfig,
    role: &str,
    metrics: Arc<BridgeMetrics>,
) -> Result<crate::wire::Client> {
    let dialect = crate::wire::Dialect::Client;
    connect_wire_to(config, &config.servers, role, metrics, dialect).await
}

/// natswal's leafnode connection to `url` (the hub's leafnode port), with
/// `[nats]`'s credentials and TLS: it carries consumer deliveries.
pub async fn connect_leaf(
    config: &NatsConfig,
    url: &str,
    metrics: Arc<BridgeMetrics>,
) -> Result<crate::wire::Client> {
    let dialect = crate::wire::Dialect::Leaf;
    let servers = [url.to_string()];
    connect_wire_to(config, &servers, "leafnode", metrics, dialect).await
}

async fn connect_wire_to(
    config: &NatsConfig,
    urls: &[String],
    role: &str,
    metrics: Arc<BridgeMetrics>,
    dialect: crate::wire::Dialect,
) -> Result<crate::wire::Client> {
    let servers = urls
        .iter()
        .map(|server| {
            crate::wire::ServerAddress::parse(server).map_err(|reason| BridgeError::Config {
                key: "nats.servers".to_string(),
                reason,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut credentials = crate::wire::Credentials {
        user: config.user.clone(),
        password: config.password.clone(),
        token: config.token.clone(),
        ..Default::default()
    };
    if let Some(path) = &config.nkey_seed_file {
        credentials.nkey_seed = Some(read_secret(path, "nkey seed")?);
    }
    if let Some(path) = &config.creds_file {
        let text = read_secret(path, "creds")?;
        let (jwt, seed) =
            crate::wire::Credentials::read_creds(&text).map_err(|reason| BridgeError::Config {
                key: "nats.creds_file".to_string(),
                reason: format!("{}: {reason}", path.display()),
            })?;
        credentials.jwt = Some(jwt);
        credentials.nkey_seed = Some(seed);
    }
    let tls = match &config.tls {
        Some(tls) => {
            check_tls_files(tls)?;
            Some(crate::wire::TlsOptions {
                ca_file: tls.ca_file.clone(),
                cert_file: tls.cert_file.clone(),
                key_file: tls.key_file.clone(),
                required: tls.required,
            })
        }
        None => None,
    };
    let options = crate::wire::Options {
        servers,
        name: format!("{}-{role}", config.name),
        credentials,
        tls,
        subscription_capacity: config.subscription_capacity,
        connect_timeout: config.connect_timeout,
        // Room for about a million acks while NATS is away.
        output_bytes_max: 64 * 1024 * 1024,
        events: wire_events(role, Arc::clone(&metrics)),
        dialect,
    };
    let client = crate::wire::Client::connect(options)
        .await
        .map_err(|failure| {
            BridgeError::nats(format!("cannot connect to {}", urls.join(", ")), failure)
        })?;
    Ok(client)
}

fn read_secret(path: &std::path::Path, what: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|error| {
        BridgeError::io(format!("cannot read {what} file {}", path.display()), error)
    })
}

fn check_tls_files(tls: &crate::config::TlsConfig) -> Result<()> {
    for path in [&tls.ca_file, &tls.cert_file, &tls.key_file]
        .into_iter()
        .flatten()
    {
        if !path.is_file() {
            return Err(BridgeError::Config {
                key: "nats.tls".to_string(),
                reason: format!("{} does not exist", path.display()),
            });
        }
    }
    Ok(())
}

/// The event hook of natswal's own client: the same metrics and logs as
/// async-nats's events, with drops counted one by one and warned about at
/// most every 10 s.
fn wire_events(
    role: &str,
    metrics: Arc<BridgeMetrics>,
) -> Arc<dyn Fn(crate::wire::Event) + Send + Sync> {
    let role = role.to_string();
    let warnings = crate::metrics::Spacing::every_ms(10_000);
    Arc::new(move |event| match event {
        crate::wire::Event::SlowConsumer { sid } => {
            metrics.slow_consumer_events.fetch_add(1, Ordering::Relaxed);
            if warnings.due() {
                tracing::warn!(
                    role,
                    subscription = sid,
                    "dropped messages for a slow consumer: natswal could not keep up; unacknowledged publishers will retry"
                );
            }
        }
        crate::wire::Event::Disconnected { reason } => {
            metrics.nats_disconnects.fetch_add(1, Ordering::Relaxed);
            metrics.set_nats_connection(&role, false);
            tracing::warn!(role, %reason, "disconnected from NATS; reconnecting");
        }
        crate::wire::Event::Connected { server } => {
            metrics.set_nats_connection(&role, true);
            tracing::info!(role, %server, "connected to NATS");
        }
        crate::wire::Event::ServerError(text) => {
            tracing::warn!(role, error = %text, "NATS server error");
        }
    })
}
