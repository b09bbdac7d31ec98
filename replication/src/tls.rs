//! Transport security between replicas: plain TCP, or TLS 1.2/1.3 with
//! mutual authentication (rustls, ring). With TLS every node presents its
//! certificate and requires one from the peer, both signed by the cluster's
//! CA; a peer without a valid client certificate is refused at the
//! handshake and the refusal is logged and counted.

use crate::error::{Error, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::Path;
use std::sync::Arc;

/// The certificate files of one node.
#[derive(Debug, Clone)]
pub struct TlsFiles<'a> {
    /// The cluster's CA: peers' certificates must chain to it.
    pub ca_file: &'a Path,
    /// This node's certificate chain, presented as server and as client.
    pub cert_file: &'a Path,
    pub key_file: &'a Path,
}

/// How a node's connections to peers are secured.
#[derive(Clone, Default)]
pub enum TransportSecurity {
    /// Plain TCP (tests, or a network secured otherwise).
    #[default]
    Plain,
    MutualTls {
        acceptor: tokio_rustls::TlsAcceptor,
        connector: tokio_rustls::TlsConnector,
    },
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|error| Error::Invalid(format!("cannot read {}: {error}", path.display())))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|error| Error::Invalid(format!("{}: {error}", path.display())))?;
    if chain.is_empty() {
        return Err(Error::Invalid(format!(
            "{} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(chain)
}

impl TransportSecurity {
    /// Mutual TLS from the node's files; every problem names its file.
    pub fn mutual_tls(files: &TlsFiles<'_>) -> Result<TransportSecurity> {
        let mut roots = rustls::RootCertStore::empty();
        for certificate in read_chain(files.ca_file)? {
            roots
                .add(certificate)
                .map_err(|error| Error::Invalid(format!("{}: {error}", files.ca_file.display())))?;
        }
        let roots = Arc::new(roots);
        let chain = read_chain(files.cert_file)?;
        let key = PrivateKeyDer::from_pem_file(files.key_file).map_err(|error| {
            Error::Invalid(format!(
                "cannot read the key {}: {error}",
                files.key_file.display()
            ))
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::clone(&roots),
            Arc::clone(&provider),
        )
        .build()
        .map_err(|error| Error::Invalid(format!("the client verifier: {error}")))?;
        let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|error| Error::Invalid(error.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|error| {
                Error::Invalid(format!(
                    "{} with {}: {error}",
                    files.cert_file.display(),
                    files.key_file.display()
                ))
            })?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| Error::Invalid(error.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|error| {
                Error::Invalid(format!(
                    "the client certificate {}: {error}",
                    files.cert_file.display()
                ))
            })?;
        Ok(TransportSecurity::MutualTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
        })
    }
}

/// The name a peer's certificate must carry: the host of its address.
pub fn server_name(address: &str) -> Result<ServerName<'static>> {
    let host = address
        .rsplit_once(':')
        .map_or(address, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .map_err(|error| Error::Invalid(format!("peer address {address}: {error}")))
}
