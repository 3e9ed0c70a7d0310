//! A service's TLS files, read and checked into a rustls server config.
//!
//! STUB (to be replaced): minimal loading without the checks and error reporting the issue
//! asks for.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{ClientAuth, TlsConfig};

/// A service's TLS settings, loaded and checked.
pub struct LoadedTls {
    /// What the handshake runs with: certificate, key, versions, ALPN, client verification.
    pub server_config: Arc<rustls::ServerConfig>,
    /// `None` without `client_ca`.
    pub client_auth: Option<ClientAuth>,
    /// Changes whenever a file's content or a setting changes (what a reload compares).
    pub fingerprint: String,
    /// The files read, for `--watch-config`.
    pub files: Vec<PathBuf>,
    /// `handshake_timeout`.
    pub handshake_timeout: Duration,
}

/// One problem with the TLS settings: the key under `tls` (`cert`, `key`, `client_ca`, ...)
/// and a message that names the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFileError {
    /// The key under `[services.<name>.tls]`.
    pub key: &'static str,
    /// What is wrong, naming the file.
    pub message: String,
}

/// Reads and checks `config`'s files. `default_alpn` is the plugin's ALPN list, used when
/// `config.alpn` is absent.
pub fn load(config: &TlsConfig, default_alpn: &[&str]) -> Result<LoadedTls, Vec<TlsFileError>> {
    let err = |key: &'static str, message: String| vec![TlsFileError { key, message }];
    let cert_pem = std::fs::read(&config.cert)
        .map_err(|e| err("cert", format!("{}: {e}", config.cert.display())))?;
    let key_pem = std::fs::read(&config.key)
        .map_err(|e| err("key", format!("{}: {e}", config.key.display())))?;
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| err("cert", format!("{}: {e}", config.cert.display())))?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| err("key", format!("{}: {e}", config.key.display())))?;
    let mut server_config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| err("key", format!("{}: {e}", config.key.display())))?;
    server_config.alpn_protocols = match &config.alpn {
        Some(list) => list.iter().map(|p| p.as_bytes().to_vec()).collect(),
        None => default_alpn.iter().map(|p| p.as_bytes().to_vec()).collect(),
    };
    Ok(LoadedTls {
        server_config: Arc::new(server_config),
        client_auth: None,
        fingerprint: format!("{cert_pem:?}{key_pem:?}"),
        files: vec![config.cert.clone(), config.key.clone()],
        handshake_timeout: config.handshake_timeout,
    })
}
