//! Opening one connection: the server address, TCP, the server's `INFO`,
//! TLS when either side asks for it, and `CONNECT` with natswal's
//! credentials (user and password, token, nkey or a `.creds` file, whose
//! key signs the server's nonce), confirmed by a `PONG` before the
//! connection is handed over.

use super::protocol::{self, ServerOp};
use bytes::BytesMut;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A connection's byte stream: TCP, or TLS over TCP.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Transport for T {}

/// One server to try, from `nats.servers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddress {
    pub host: String,
    pub port: u16,
    /// `tls://`: refuse the server unless it speaks TLS.
    pub tls_required: bool,
    pub user: Option<String>,
    pub password: Option<String>,
}

impl ServerAddress {
    /// Parses `nats://[user[:password]@]host[:port]`, `tls://...` or
    /// `host[:port]` (port 4222 by default).
    pub fn parse(text: &str) -> Result<ServerAddress, String> {
        let with_scheme = if text.contains("://") {
            text.to_string()
        } else {
            format!("nats://{text}")
        };
        let url = url::Url::parse(&with_scheme).map_err(|error| format!("'{text}': {error}"))?;
        let tls_required = match url.scheme() {
            "nats" => false,
            "tls" => true,
            other => {
                return Err(format!(
                    "'{text}': scheme '{other}' is not nats:// or tls://"
                ))
            }
        };
        let host = url
            .host_str()
            .ok_or_else(|| format!("'{text}' has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let decode = |part: &str| {
            url::form_urlencoded::parse(format!("x={part}").as_bytes())
                .next()
                .map(|(_, value)| value.into_owned())
                .unwrap_or_default()
        };
        Ok(ServerAddress {
            host,
            port: url.port().unwrap_or(4222),
            tls_required,
            user: (!url.username().is_empty()).then(|| decode(url.username())),
            password: url.password().map(decode),
        })
    }
}

/// TLS settings (`[nats.tls]`).
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub required: bool,
}

/// Credentials sent in `CONNECT`.
#[derive(Clone, Default)]
pub struct Credentials {
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// An nkey seed (from `nkey_seed_file`, or the seed of a `.creds` file).
    pub nkey_seed: Option<String>,
    /// The user JWT of a `.creds` file.
    pub jwt: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets stay out of logs.
        formatter
            .debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("nkey_seed", &self.nkey_seed.as_ref().map(|_| "***"))
            .field("jwt", &self.jwt.as_ref().map(|_| "***"))
            .finish()
    }
}

impl Credentials {
    /// Reads the JWT and the seed of a `.creds` file.
    pub fn read_creds(text: &str) -> Result<(String, String), String> {
        let block_after = |marker: &str| {
            let mut lines = text.lines().map(str::trim);
            lines.find(|line| line.contains(marker))?;
            lines
                .find(|line| !line.is_empty())
                .filter(|line| !line.starts_with("---"))
                .map(str::to_string)
        };
        let jwt = block_after("BEGIN NATS USER JWT").ok_or("no user JWT block")?;
        let seed = block_after("BEGIN USER NKEY SEED").ok_or("no user nkey seed block")?;
        Ok((jwt, seed))
    }
}

/// Why a connection could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The server refused the credentials: trying again will not help.
    Refused(String),
    /// Anything else (unreachable, timed out, TLS, protocol).
    Failed(String),
}

impl std::fmt::Display for ConnectFailure {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectFailure::Refused(text) | ConnectFailure::Failed(text) => {
                formatter.write_str(text)
            }
        }
    }
}

/// What the server said about itself.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default)]
pub struct ServerInfo {
    pub server_id: String,
    pub max_payload: usize,
    pub tls_required: bool,
    pub tls_available: bool,
    pub nonce: Option<String>,
    pub headers: bool,
    /// A leafnode hub's account for this connection (its interest lines
    /// may name it first).
    pub remote_account: Option<String>,
}

/// An open, authenticated connection.
pub struct Opened {
    pub transport: Box<dyn Transport>,
    /// Bytes read past the handshake's `PONG`.
    pub leftover: BytesMut,
    pub info: ServerInfo,
}

/// Opens one connection to `address`, bounded by `timeout` in total.
pub async fn open(
    address: &ServerAddress,
    name: &str,
    credentials: &Credentials,
    tls: Option<&TlsOptions>,
    timeout: Duration,
    dialect: protocol::Dialect,
) -> Result<Opened, ConnectFailure> {
    let at = format!("{}:{}", address.host, address.port);
    let opening = open_unbounded(address, name, credentials, tls, dialect);
    match tokio::time::timeout(timeout, opening).await {
        Ok(result) => result.map_err(|failure| match failure {
            ConnectFailure::Refused(text) => ConnectFailure::Refused(format!("{at}: {text}")),
            ConnectFailure::Failed(text) => ConnectFailure::Failed(format!("{at}: {text}")),
        }),
        Err(_) => Err(ConnectFailure::Failed(format!(
            "{at}: timed out after {} (is nats-server running and reachable?)",
            humantime::format_duration(timeout)
        ))),
    }
}

async fn open_unbounded(
    address: &ServerAddress,
    name: &str,
    credentials: &Credentials,
    tls: Option<&TlsOptions>,
    dialect: protocol::Dialect,
) -> Result<Opened, ConnectFailure> {
    let failed = |text: String| ConnectFailure::Failed(text);
    let tcp = tokio::net::TcpStream::connect((address.host.as_str(), address.port))
        .await
        .map_err(|error| failed(format!("cannot connect: {error}")))?;
    tcp.set_nodelay(true)
        .map_err(|error| failed(format!("cannot set TCP_NODELAY: {error}")))?;
    let mut transport: Box<dyn Transport> = Box::new(tcp);
    let mut buffer = BytesMut::with_capacity(4096);
    let info_bytes = match next_op(&mut transport, &mut buffer).await? {
        ServerOp::Info(bytes) => bytes,
        other => return Err(failed(format!("the server began with {other:?}, not INFO"))),
    };
    let info: ServerInfo = serde_json::from_slice(&info_bytes)
        .map_err(|error| failed(format!("the server's INFO does not parse: {error}")))?;
    let want_tls = address.tls_required || tls.is_some_and(|tls| tls.required);
    if want_tls && !(info.tls_required || info.tls_available) {
        return Err(failed(
            "TLS is required (nats.tls.required or tls://) but the server does not offer it"
                .to_string(),
        ));
    }
    let use_tls = want_tls || info.tls_required;
    if use_tls {
        if !buffer.is_empty() {
            return Err(failed(
                "the server sent data before the TLS handshake".to_string(),
            ));
        }
        let config = tls_config(tls.cloned().unwrap_or_default())
            .map_err(|text| failed(format!("TLS failed: {text}")))?;
        let server_name = rustls_pki_types::ServerName::try_from(address.host.clone())
            .map_err(|error| failed(format!("TLS failed: bad server name: {error}")))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(server_name, transport)
            .await
            .map_err(|error| {
                failed(format!(
                    "TLS failed: {error} (check nats.tls.ca_file and the server certificate)"
                ))
            })?;
        transport = Box::new(stream);
    }
    let mut output = BytesMut::new();
    let mut options = connect_options(address, name, credentials, &info, use_tls)?;
    if dialect == protocol::Dialect::Leaf {
        // A leafnode names itself as a server and sends no `lang` (the
        // hub takes a CONNECT with one for a client at the wrong port).
        options["server_id"] = format!("NATSWAL{}", std::process::id()).into();
        if let Some(fields) = options.as_object_mut() {
            fields.remove("lang");
        }
    }
    protocol::encode_connect(&mut output, &options);
    output.extend_from_slice(protocol::PING);
    transport
        .write_all(&output)
        .await
        .map_err(|error| failed(format!("cannot send CONNECT: {error}")))?;
    transport
        .flush()
        .await
        .map_err(|error| failed(format!("cannot send CONNECT: {error}")))?;
    loop {
        match next_op(&mut transport, &mut buffer).await? {
            ServerOp::Pong => break,
            ServerOp::Ok | ServerOp::Info(_) | ServerOp::Ping | ServerOp::Interest { .. } => {}
            ServerOp::Err(text) => {
                let lower = text.to_ascii_lowercase();
                return Err(
                    if lower.contains("authorization") || lower.contains("authentication") {
                        ConnectFailure::Refused(format!(
                        "authorization violation: the server refused natswal's credentials (check nats.user/password, token, nkey or creds): {text}"
                    ))
                    } else {
                        failed(format!("the server refused the connection: {text}"))
                    },
                );
            }
            ServerOp::Message(_) => {
                return Err(failed("a message before the handshake ended".to_string()))
            }
        }
    }
    Ok(Opened {
        transport,
        leftover: buffer,
        info,
    })
}

/// Reads until one whole operation is in `buffer`.
async fn next_op(
    transport: &mut Box<dyn Transport>,
    buffer: &mut BytesMut,
) -> Result<ServerOp, ConnectFailure> {
    loop {
        if let Some(op) =
            protocol::parse(buffer).map_err(|error| ConnectFailure::Failed(error.to_string()))?
        {
            return Ok(op);
        }
        let read = transport
            .read_buf(buffer)
            .await
            .map_err(|error| ConnectFailure::Failed(format!("cannot read: {error}")))?;
        if read == 0 {
            return Err(ConnectFailure::Failed(
                "the server closed the connection during the handshake".to_string(),
            ));
        }
    }
}

fn connect_options(
    address: &ServerAddress,
    name: &str,
    credentials: &Credentials,
    info: &ServerInfo,
    tls: bool,
) -> Result<serde_json::Value, ConnectFailure> {
    let mut options = serde_json::json!({
        "verbose": false,
        "pedantic": false,
        "lang": "rust-natswal",
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": 1,
        "headers": true,
        "no_responders": true,
        "echo": true,
        "tls_required": tls,
        "name": name,
    });
    let user = address.user.as_ref().or(credentials.user.as_ref());
    let password = address.password.as_ref().or(credentials.password.as_ref());
    if let Some(user) = user {
        options["user"] = user.clone().into();
    }
    if let Some(password) = password {
        options["pass"] = password.clone().into();
    }
    if let Some(token) = &credentials.token {
        options["auth_token"] = token.clone().into();
    }
    if let Some(jwt) = &credentials.jwt {
        options["jwt"] = jwt.clone().into();
    }
    if let Some(seed) = &credentials.nkey_seed {
        let key = nkeys::KeyPair::from_seed(seed.trim()).map_err(|error| {
            ConnectFailure::Refused(format!("the nkey seed does not parse: {error}"))
        })?;
        if credentials.jwt.is_none() {
            options["nkey"] = key.public_key().into();
        }
        if let Some(nonce) = &info.nonce {
            let signature = key.sign(nonce.as_bytes()).map_err(|error| {
                ConnectFailure::Refused(format!("cannot sign the server's nonce: {error}"))
            })?;
            options["sig"] = data_encoding::BASE64URL_NOPAD.encode(&signature).into();
        }
    }
    Ok(options)
}

/// The rustls client configuration: the given CA (else the system's
/// roots), and the client certificate when one is configured.
fn tls_config(options: TlsOptions) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = &options.ca_file {
        let certificates = CertificateDer::pem_file_iter(path)
            .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
        for certificate in certificates {
            let certificate =
                certificate.map_err(|error| format!("{}: {error}", path.display()))?;
            roots
                .add(certificate)
                .map_err(|error| format!("{}: {error}", path.display()))?;
        }
    } else {
        for certificate in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(certificate);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| error.to_string())?
        .with_root_certificates(roots);
    match (&options.cert_file, &options.key_file) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|error| format!("cannot read {}: {error}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| format!("{}: {error}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|error| format!("cannot read the key {}: {error}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|error| format!("the client certificate: {error}"))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses_parse_like_the_nats_clients() {
        let address = ServerAddress::parse("nats://al%40ice:p%3Ass@127.0.0.1:4333").unwrap();
        assert_eq!(
            address,
            ServerAddress {
                host: "127.0.0.1".to_string(),
                port: 4333,
                tls_required: false,
                user: Some("al@ice".to_string()),
                password: Some("p:ss".to_string()),
            }
        );
        let plain = ServerAddress::parse("localhost").unwrap();
        assert_eq!((plain.host.as_str(), plain.port), ("localhost", 4222));
        let secure = ServerAddress::parse("tls://[::1]:4443").unwrap();
        assert_eq!(
            (secure.host.as_str(), secure.port, secure.tls_required),
            ("::1", 4443, true)
        );
        let error = ServerAddress::parse("http://x:1").unwrap_err();
        assert!(error.contains("scheme 'http'"), "{error}");
    }

    #[test]
    fn a_creds_file_gives_its_jwt_and_seed() {
        let text = "-----BEGIN NATS USER JWT-----\neyJhbGciOi.payload.sig\n------END NATS USER JWT------\n\n\
************************* IMPORTANT *************************\nNKEY Seed printed below.\n\n\
-----BEGIN USER NKEY SEED-----\nSUAIBDPBAUTWCWBKIO6XHQNINK5FWJW4OHLXC3HQ2KFE4PEJUA44CNHTC4\n------END USER NKEY SEED------\n";
        let (jwt, seed) = Credentials::read_creds(text).unwrap();
        assert_eq!(jwt, "eyJhbGciOi.payload.sig");
        assert!(seed.starts_with("SUAI"));
        assert!(Credentials::read_creds("nothing here").is_err());
    }
}
