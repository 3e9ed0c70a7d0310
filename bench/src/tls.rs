//! Client-side TLS, shared by `wharf client ... --tls` (blocking sockets, `src/client.rs`) and
//! `wharf bench ... --tls` (tokio-rustls, [`crate::load`]): the flags, the rustls
//! `ClientConfig` they describe, and the one-line explanation of a failed handshake.
//!
//! The server side is wharf-core's (`core/src/tls`). Nothing here is specific to wharf: the
//! same flags work against any TLS server (nginx, `openssl s_server`).
//!
//! Trust: `--ca FILE` trusts exactly the CAs in that file; without it, the system's store
//! (`/etc/ssl/certs` on Debian, `SSL_CERT_FILE`/`SSL_CERT_DIR` honoured), as curl and
//! openssl do. That store is what an administrator already maintains; a compiled-in root list
//! (webpki-roots) would go stale with the binary, and the platform verifier adds OS-specific
//! weight for nothing on Linux.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore};

/// `--tls [--ca FILE] [--cert FILE --key FILE] [--server-name NAME]`
#[derive(Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// Speak TLS 1.2 or 1.3 (rustls), verifying the server's certificate.
    #[arg(long)]
    pub tls: bool,
    /// Trust the CA certificates in this PEM file (default: the system's trust store).
    #[arg(long, value_name = "FILE", requires = "tls")]
    pub ca: Option<PathBuf>,
    /// Present this client certificate chain (PEM); needs --key.
    #[arg(long, value_name = "FILE", requires_all = ["tls", "key"])]
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(long, value_name = "FILE", requires_all = ["tls", "cert"])]
    pub key: Option<PathBuf>,
    /// The name the server's certificate must carry, also sent as SNI (default: the host of
    /// the address; an IP address is checked against the certificate's IP names).
    #[arg(long, value_name = "NAME", requires = "tls")]
    pub server_name: Option<String>,
}

/// A TLS client setup: what to connect with and how to explain a failure.
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
    /// Whether a client certificate is offered (how a refusal alert reads).
    sends_cert: bool,
    /// Where trusted CAs come from, as the user named it (for "unknown CA").
    trust: String,
}

impl TlsArgs {
    /// The TLS setup for connecting to `addr` (`host:port`), `None` without `--tls`, or a
    /// one-line error naming the file or flag at fault.
    pub fn client(&self, addr: &str) -> Result<Option<ClientTls>, String> {
        if !self.tls {
            return Ok(None);
        }
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => host_of(addr).to_string(),
        };
        let server_name = ServerName::try_from(name.as_str())
            .map(|n| n.to_owned())
            .map_err(|_| {
                format!("`{name}` is not a valid TLS server name (a DNS name or an IP address); use --server-name")
            })?;
        let (roots, trust) = match &self.ca {
            Some(file) => (roots_from_file(file)?, format!("--ca {}", file.display())),
            None => (system_roots()?, "the system's trust store".to_string()),
        };
        let builder = ClientConfig::builder().with_root_certificates(roots);
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = certs_from_file(cert)?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("--key {}: {}", key.display(), pem_error(&e)))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("--cert/--key: {e}"))?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Some(ClientTls {
            config: Arc::new(config),
            server_name,
            sends_cert: self.cert.is_some(),
            trust,
        }))
    }
}

/// The host part of `host:port`, `[v6]:port` or a bare host.
pub fn host_of(addr: &str) -> &str {
    if addr.parse::<std::net::IpAddr>().is_ok() {
        return addr; // `::1` has colons but no port
    }
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => addr,
    };
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

fn certs_from_file(file: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {}", file.display(), pem_error(&e)))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", file.display()));
    }
    Ok(certs)
}

fn roots_from_file(file: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_file(file).map_err(|e| format!("--ca {e}"))? {
        roots
            .add(cert)
            .map_err(|e| format!("--ca {}: {e}", file.display()))?;
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    // Some system bundles hold certificates webpki cannot parse: skip those, as browsers do.
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(format!(
            "no trusted CA certificates in the system's trust store{why}; pass --ca FILE"
        ));
    }
    Ok(roots)
}

fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(e) => e.to_string(),
        Error::NoItemsFound => "no PEM item of the expected kind in it".into(),
        other => format!("not valid PEM ({other:?})"),
    }
}

impl ClientTls {
    /// The server name as the user would write it.
    pub fn server_name_text(&self) -> String {
        match &self.server_name {
            ServerName::DnsName(name) => name.as_ref().to_string(),
            ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
            other => format!("{other:?}"),
        }
    }

    /// One line saying what failed in a TLS conversation, when `e` is a TLS failure (a rustls
    /// error, or the server closing during the handshake); `None` for plain IO errors.
    /// `handshaking`: whether the handshake was under way; `answer`: the first bytes the
    /// server sent, when known (to show a plaintext answer).
    pub fn explain(&self, e: &io::Error, handshaking: bool, answer: &[u8]) -> Option<String> {
        if let Some(e) = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
            return Some(self.explain_tls(e, answer));
        }
        let closed = matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
        );
        (handshaking && closed).then(|| {
            if answer.is_empty() {
                "TLS handshake failed: the server closed the connection without answering \
                 (does it speak TLS on this port?)"
                    .to_string()
            } else {
                not_tls(answer)
            }
        })
    }

    /// One line for a rustls error.
    pub fn explain_tls(&self, e: &rustls::Error, answer: &[u8]) -> String {
        use rustls::Error;
        let name = self.server_name_text();
        match e {
            // Whatever rustls made of it, an answer that is not TLS explains it best.
            _ if !answer.is_empty() && !looks_like_tls(answer) => not_tls(answer),
            Error::InvalidCertificate(c) => self.explain_certificate(c, &name),
            Error::AlertReceived(alert) => self.explain_alert(*alert),
            Error::InvalidMessage(_) => {
                format!("TLS failed: the server sent something that is not TLS ({e})")
            }
            other => format!("TLS failed: {other}"),
        }
    }

    fn explain_certificate(&self, c: &CertificateError, name: &str) -> String {
        let what = "the server's certificate";
        match c {
            CertificateError::UnknownIssuer => format!(
                "TLS: {what} is signed by an unknown CA (not in {}); pass --ca with the CA that \
                 issued it",
                self.trust
            ),
            CertificateError::NotValidForNameContext { presented, .. } => format!(
                "TLS: name mismatch: {what} is not valid for `{name}` (it names {}); pass \
                 --server-name with one of those",
                if presented.is_empty() {
                    "nothing".to_string()
                } else {
                    presented
                        .iter()
                        .map(|n| presented_name(n))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ),
            CertificateError::NotValidForName => {
                format!("TLS: name mismatch: {what} is not valid for `{name}`; pass --server-name")
            }
            CertificateError::ExpiredContext { time, not_after } => format!(
                "TLS: {what} expired on {} (now {})",
                date(*not_after),
                date(*time)
            ),
            CertificateError::Expired => format!("TLS: {what} has expired"),
            CertificateError::NotValidYetContext { time, not_before } => format!(
                "TLS: {what} is not valid before {} (now {})",
                date(*not_before),
                date(*time)
            ),
            CertificateError::NotValidYet => format!("TLS: {what} is not valid yet"),
            other => format!("TLS: {what} was refused: {other}"),
        }
    }

    fn explain_alert(&self, alert: AlertDescription) -> String {
        let name = alert_name(alert);
        match alert {
            AlertDescription::CertificateRequired => {
                "TLS: the server requires a client certificate (alert certificate_required); \
                 pass --cert and --key"
                    .to_string()
            }
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied
            | AlertDescription::HandshakeFailure
                if self.sends_cert =>
            {
                format!("TLS: the server refused our client certificate (alert {name})")
            }
            AlertDescription::HandshakeFailure
            | AlertDescription::BadCertificate
            | AlertDescription::AccessDenied => format!(
                "TLS: the server ended the handshake (alert {name}): it may require a client \
                 certificate (--cert, --key)"
            ),
            _ => format!("TLS: the server ended the connection (alert {name})"),
        }
    }
}

/// A certificate name as webpki describes it (`DnsName("localhost")`, `IpAddress(127.0.0.1)`)
/// without the wrapping.
fn presented_name(described: &str) -> &str {
    match described.split_once('(') {
        Some((_, rest)) => {
            let inner = rest.strip_suffix(')').unwrap_or(rest);
            inner
                .strip_prefix('"')
                .and_then(|i| i.strip_suffix('"'))
                .unwrap_or(inner)
        }
        None => described,
    }
}

/// Whether `bytes` start like a TLS record: content type 20..=24, version 3.x.
fn looks_like_tls(bytes: &[u8]) -> bool {
    matches!(bytes, [20..=24, 3, ..] | [20..=24])
}

/// The message for a server that answered the handshake in plaintext.
fn not_tls(answer: &[u8]) -> String {
    format!(
        "the server does not speak TLS: it answered the handshake in plaintext: `{}`",
        quoted(answer)
    )
}

/// The start of what a server answered, for an error message: trailing whitespace trimmed,
/// escaped, cut after 60 characters.
pub fn quoted(answer: &[u8]) -> String {
    const SHOWN: usize = 60;
    let text = String::from_utf8_lossy(answer);
    let text = text.trim_end();
    let mut shown: String = text
        .chars()
        .take(SHOWN)
        .flat_map(char::escape_debug)
        .collect();
    if text.chars().count() > SHOWN {
        shown.push_str("...");
    }
    shown
}

/// An alert's name as RFC 8446 writes it (`certificate_required`).
fn alert_name(alert: AlertDescription) -> String {
    let camel = format!("{alert:?}");
    let mut name = String::with_capacity(camel.len() + 4);
    let mut previous: Option<char> = None;
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            // A new word starts at a capital after a small letter (`UnknownCA`: unknown_ca).
            if previous.is_some_and(|p| !p.is_ascii_uppercase()) {
                name.push('_');
            }
            name.push(c.to_ascii_lowercase());
        } else {
            name.push(c);
        }
        previous = Some(c);
    }
    name
}

/// A certificate time as an RFC 3339 date and time (UTC).
fn date(t: UnixTime) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.as_secs());
    humantime::format_rfc3339_seconds(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_name_defaults_to_the_host_of_the_address() {
        assert_eq!(host_of("localhost:8000"), "localhost");
        assert_eq!(host_of("127.0.0.1:8000"), "127.0.0.1");
        assert_eq!(host_of("[::1]:8000"), "::1");
        assert_eq!(host_of("example.org"), "example.org");
        assert_eq!(host_of("::1"), "::1");
    }

    #[test]
    fn alerts_are_named_as_the_rfc_writes_them() {
        assert_eq!(
            alert_name(AlertDescription::CertificateRequired),
            "certificate_required"
        );
        assert_eq!(alert_name(AlertDescription::UnknownCA), "unknown_ca");
        assert_eq!(
            alert_name(AlertDescription::HandshakeFailure),
            "handshake_failure"
        );
    }

    #[test]
    fn certificate_names_are_shown_bare() {
        assert_eq!(presented_name("DnsName(\"localhost\")"), "localhost");
        assert_eq!(presented_name("IpAddress(127.0.0.1)"), "127.0.0.1");
        assert_eq!(
            presented_name("UniformResourceIdentifier(\"spiffe://x/y\")"),
            "spiffe://x/y"
        );
        assert_eq!(presented_name("DirectoryName"), "DirectoryName");
    }

    #[test]
    fn a_plaintext_answer_is_told_apart_from_tls() {
        assert!(looks_like_tls(&[22, 3, 3, 0, 5]));
        assert!(looks_like_tls(&[21]));
        assert!(!looks_like_tls(b"HTTP/1.1 400 Bad Request"));
        assert_eq!(
            not_tls(b"auth required\n"),
            "the server does not speak TLS: it answered the handshake in plaintext: `auth required`"
        );
    }

    #[test]
    fn flags_without_tls_mean_plaintext_and_bad_names_are_refused() {
        assert!(TlsArgs::default().client("a:1").unwrap().is_none());
        let args = TlsArgs {
            tls: true,
            server_name: Some("not a name!".into()),
            ..TlsArgs::default()
        };
        let err = args.client("127.0.0.1:1").unwrap_err();
        assert!(err.contains("not a valid TLS server name"), "{err}");
        let args = TlsArgs {
            tls: true,
            ca: Some("/nonexistent/ca.pem".into()),
            ..TlsArgs::default()
        };
        let err = args.client("127.0.0.1:1").unwrap_err();
        assert!(err.starts_with("--ca /nonexistent/ca.pem: "), "{err}");
    }
}
