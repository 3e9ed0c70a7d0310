//! A service's TLS files, read and checked into a rustls server config.
//!
//! [`load`] is the one place `[services.<name>.tls]` meets the file system: `wharf check`,
//! startup and every reload (SIGHUP, `--watch-config`) run it, before anything binds or
//! changes. It reads the certificate chain, the private key and the client CA file, and checks
//! what rustls would only find out at the first handshake, or never: a key that does not match
//! the certificate, a certificate that has expired or is not yet valid, a CA file without a
//! certificate. Every problem is reported, not just the first, each under the key it concerns
//! (`cert`, `key`, `client_ca`) with a message naming the file; the binary's plan
//! (`src/plan.rs`) turns them into config errors naming the config file too.
//!
//! Nothing here ever quotes a file's content: a key file's lines are secrets.
//!
//! Elsewhere: settings that need no file (ALPN entries, `client_auth` without `client_ca`) are
//! checked with the rest of the config ([`crate::config`]); the handshake itself is the TLS
//! layer's ([`super`]); a reload compares [`LoadedTls::fingerprint`] to tell whether the files
//! changed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::md5::{hex, Md5};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SigningKey};
use rustls::{InconsistentKeys, RootCertStore, ServerConfig};

use crate::config::{ClientAuth, TlsConfig, TlsVersion};

/// Largest TLS file read: a chain is a few KiB, a large CA bundle a few hundred.
pub const MAX_TLS_FILE_BYTES: u64 = 1 << 20;

/// Longest ALPN protocol name: the protocol's own limit (a one-byte length).
pub const MAX_ALPN_BYTES: usize = 255;

/// A service's TLS settings, loaded and checked.
pub struct LoadedTls {
    /// What the handshake runs with: certificate, key, versions, ALPN, client verification.
    pub server_config: Arc<rustls::ServerConfig>,
    /// `None` without `client_ca`.
    pub client_auth: Option<ClientAuth>,
    /// Changes whenever a file's content or a setting changes (what a reload compares). A
    /// digest, never the content itself.
    pub fingerprint: String,
    /// The files read, for `--watch-config`.
    pub files: Vec<PathBuf>,
    /// The [`content_digest`] of each of `files`, as read: what `--watch-config` compares
    /// the files with, so a change made while they were being loaded is not missed.
    pub digests: Vec<String>,
    /// `handshake_timeout`.
    pub handshake_timeout: Duration,
    /// When the server certificate (the chain's first) stops being valid, for `wharf check`.
    pub not_after: SystemTime,
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
/// `config.alpn` is absent. Relative paths are taken as they are (relative to the working
/// directory); the config loader has already made them relative to the config file.
pub fn load(config: &TlsConfig, default_alpn: &[&str]) -> Result<LoadedTls, Vec<TlsFileError>> {
    load_at(config, default_alpn, SystemTime::now())
}

/// [`load`], with validity checked at `now`.
fn load_at(
    config: &TlsConfig,
    default_alpn: &[&str],
    now: SystemTime,
) -> Result<LoadedTls, Vec<TlsFileError>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut errors = Vec::new();

    let cert_pem = report(&mut errors, "cert", read_file(&config.cert));
    let key_pem = report(&mut errors, "key", read_file(&config.key));
    let ca_pem = match &config.client_ca {
        Some(path) => report(&mut errors, "client_ca", read_file(path)).map(|pem| (path, pem)),
        None => None,
    };
    let chain = cert_pem
        .as_ref()
        .and_then(|pem| report(&mut errors, "cert", server_chain(&config.cert, pem, now)));
    let key = key_pem
        .as_ref()
        .and_then(|pem| report(&mut errors, "key", private_key(&config.key, pem, &provider)));
    if let (Some(chain), Some((_, signing_key))) = (&chain, &key) {
        report(
            &mut errors,
            "key",
            key_matches(config, &chain.certs, signing_key),
        );
    }
    let verifier = ca_pem.as_ref().and_then(|(path, pem)| {
        report(
            &mut errors,
            "client_ca",
            client_verifier(path, pem, config.client_auth, &provider, now),
        )
    });
    let versions = match config.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12][..],
        TlsVersion::Tls13 => &[&rustls::version::TLS13][..],
    };
    let alpn: Vec<Vec<u8>> = match &config.alpn {
        Some(list) => list.iter().map(|p| p.as_bytes().to_vec()).collect(),
        None => default_alpn.iter().map(|p| p.as_bytes().to_vec()).collect(),
    };

    let (Some(chain), Some((key_der, _)), Some(cert_pem), Some(key_pem)) =
        (chain, key, cert_pem, key_pem)
    else {
        return Err(errors);
    };
    if !errors.is_empty() || (config.client_ca.is_some() && verifier.is_none()) {
        return Err(errors);
    }
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| vec![unexpected("min_version", e)])?;
    let builder = match verifier {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut server_config = builder
        .with_single_cert(chain.certs, key_der)
        .map_err(|e| vec![unexpected("key", e)])?;
    server_config.alpn_protocols = alpn;

    let mut fingerprint = Fingerprint::default();
    let mut files = Vec::new();
    let mut digests = Vec::new();
    let contents = [(&config.cert, &cert_pem), (&config.key, &key_pem)]
        .into_iter()
        .chain(ca_pem.as_ref().map(|(path, pem)| (*path, pem)));
    for (path, content) in contents {
        fingerprint.add(path.as_os_str().as_encoded_bytes());
        fingerprint.add(content);
        files.push(path.clone());
        digests.push(content_digest(content));
    }
    let settings = (&server_config.alpn_protocols, config.client_auth);
    fingerprint.add(format!("{settings:?}").as_bytes());
    let settings = (config.min_version, config.handshake_timeout);
    fingerprint.add(format!("{settings:?}").as_bytes());

    Ok(LoadedTls {
        server_config: Arc::new(server_config),
        client_auth: config.client_ca.as_ref().map(|_| config.client_auth),
        fingerprint: fingerprint.finish(),
        files,
        digests,
        handshake_timeout: config.handshake_timeout,
        not_after: chain.not_after,
    })
}

/// `result`'s value; its error goes to `errors`, under `key`.
fn report<T>(
    errors: &mut Vec<TlsFileError>,
    key: &'static str,
    result: Result<T, String>,
) -> Option<T> {
    result
        .map_err(|message| errors.push(TlsFileError { key, message }))
        .ok()
}

/// A failure the checks before it should have made impossible; reported all the same.
fn unexpected(key: &'static str, e: rustls::Error) -> TlsFileError {
    TlsFileError {
        key,
        message: format!("the TLS settings were refused: {e}"),
    }
}

/// A digest of length-prefixed parts (so that moving bytes between parts changes it).
#[derive(Default)]
struct Fingerprint(Md5);

impl Fingerprint {
    fn add(&mut self, part: &[u8]) {
        self.0.update((part.len() as u64).to_le_bytes());
        self.0.update(part);
    }

    fn finish(self) -> String {
        hex(&self.0.digest())
    }
}

/// A digest of a file's content (not a secret, unlike a key file's content): what tells a
/// changed file.
pub fn content_digest(content: &[u8]) -> String {
    let mut digest = Fingerprint::default();
    digest.add(content);
    digest.finish()
}

/// Reads a TLS file: a regular file, at most [`MAX_TLS_FILE_BYTES`].
pub fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    crate::config::read_regular_file(path, MAX_TLS_FILE_BYTES)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The server's chain, checked.
struct Chain {
    certs: Vec<CertificateDer<'static>>,
    /// The leaf's end of validity.
    not_after: SystemTime,
}

/// The certificates of the `cert` file, leaf first, each valid at `now`.
fn server_chain(path: &Path, pem: &[u8], now: SystemTime) -> Result<Chain, String> {
    let certs = certificates(path, pem)?;
    let mut problems = Vec::new();
    let mut not_after = None;
    for (i, der) in certs.iter().enumerate() {
        let which = match i {
            0 => format!("certificate in {}", path.display()),
            i => format!("certificate {} of the chain in {}", i + 1, path.display()),
        };
        match validity(der) {
            Ok(v) => {
                if i == 0 {
                    not_after = Some(v.not_after.0);
                }
                problems.extend(v.problem_at(now, &which));
            }
            Err(e) => problems.push(format!("{which} is not a valid X.509 certificate: {e}")),
        }
    }
    match (not_after, problems.is_empty()) {
        (Some(not_after), true) => Ok(Chain { certs, not_after }),
        _ => Err(problems.join("; ")),
    }
}

/// Every certificate of a PEM file; at least one.
fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_problem(path, &e))?;
    if certs.is_empty() {
        let hint = if PrivateKeyDer::from_pem_slice(pem).is_ok() {
            " (it holds a private key: is it the `key` file?)"
        } else {
            " (PEM `BEGIN CERTIFICATE` sections expected)"
        };
        return Err(format!("no certificate in {}{hint}", path.display()));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, SEC1 or PKCS#1), loaded by the crypto provider.
fn private_key(
    path: &Path,
    pem: &[u8],
    provider: &CryptoProvider,
) -> Result<(PrivateKeyDer<'static>, Arc<dyn SigningKey>), String> {
    let shown = path.display();
    let der = match PrivateKeyDer::from_pem_slice(pem) {
        Ok(der) => der,
        Err(pem::Error::NoItemsFound) => {
            let text = String::from_utf8_lossy(pem);
            let hint = if text.contains("ENCRYPTED") {
                " (it holds an encrypted key: wharf needs it unencrypted, e.g. \
                 `openssl pkey -in encrypted.key -out server.key`)"
            } else if text.contains("BEGIN CERTIFICATE") {
                " (it holds a certificate: is it the `cert` file?)"
            } else {
                " (PEM PKCS#8, SEC1 or PKCS#1 expected)"
            };
            return Err(format!("no private key in {shown}{hint}"));
        }
        Err(e) => return Err(pem_problem(path, &e)),
    };
    let signing_key = provider
        .key_provider
        .load_private_key(der.clone_key())
        .map_err(|e| format!("unusable private key in {shown}: {e}"))?;
    Ok((der, signing_key))
}

/// Whether the key is the leaf certificate's; when it is another certificate's of the chain,
/// says that the chain is out of order.
fn key_matches(
    config: &TlsConfig,
    certs: &[CertificateDer<'static>],
    key: &Arc<dyn SigningKey>,
) -> Result<(), String> {
    let matches = |cert: &CertificateDer<'static>| {
        CertifiedKey::new(vec![cert.clone()], Arc::clone(key)).keys_match()
    };
    let Some(leaf) = certs.first() else {
        return Ok(());
    };
    match matches(leaf) {
        // A key type whose public half the provider cannot tell: the handshake will show.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => Ok(()),
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            let position = certs.iter().skip(1).position(|c| matches(c).is_ok());
            let hint = match position {
                Some(i) => format!(
                    " but certificate {} of the chain; the server's certificate must come first",
                    i + 2
                ),
                None => String::new(),
            };
            Err(format!(
                "key in {} does not match the certificate in {}{hint}",
                config.key.display(),
                config.cert.display()
            ))
        }
        Err(e) => Err(format!(
            "cannot compare the key in {} with the certificate in {}: {e}",
            config.key.display(),
            config.cert.display()
        )),
    }
}

/// The client certificate verifier of a `client_ca` file: its certificates are the trust
/// anchors; `client_auth` says whether a client may come without a certificate.
fn client_verifier(
    path: &Path,
    pem: &[u8],
    client_auth: ClientAuth,
    provider: &Arc<CryptoProvider>,
    now: SystemTime,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, String> {
    let certs = certificates(path, pem)?;
    let mut roots = RootCertStore::empty();
    let mut problems = Vec::new();
    for (i, der) in certs.into_iter().enumerate() {
        let which = format!("CA certificate {} in {}", i + 1, path.display());
        match validity(&der) {
            Ok(v) => problems.extend(v.problem_at(now, &which)),
            Err(e) => problems.push(format!("{which} is not a valid X.509 certificate: {e}")),
        }
        if let Err(e) = roots.add(der) {
            problems.push(format!("{which} cannot be a trust anchor: {e}"));
        }
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    let builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider));
    let builder = match client_auth {
        ClientAuth::Required => builder,
        ClientAuth::Optional => builder.allow_unauthenticated(),
    };
    builder
        .build()
        .map_err(|e| format!("cannot verify clients with {}: {e}", path.display()))
}

/// A certificate's validity period.
struct Validity {
    not_before: (SystemTime, String),
    not_after: (SystemTime, String),
}

impl Validity {
    /// What is wrong with using the certificate (`which` names it) at `now`, if anything.
    fn problem_at(&self, now: SystemTime, which: &str) -> Option<String> {
        if now > self.not_after.0 {
            Some(format!("{which} expired on {}", self.not_after.1))
        } else if now < self.not_before.0 {
            Some(format!("{which} is not valid before {}", self.not_before.1))
        } else {
            None
        }
    }
}

/// Reads the validity period of a DER certificate.
fn validity(der: &CertificateDer<'_>) -> Result<Validity, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| e.to_string())?;
    let time = |t: &x509_parser::time::ASN1Time| {
        let at = t.to_datetime();
        let seconds = t.timestamp();
        let offset = Duration::from_secs(seconds.unsigned_abs());
        let system = match seconds >= 0 {
            true => UNIX_EPOCH.checked_add(offset),
            false => UNIX_EPOCH.checked_sub(offset),
        }
        .unwrap_or(UNIX_EPOCH);
        let shown = format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            at.year(),
            u8::from(at.month()),
            at.day(),
            at.hour(),
            at.minute(),
            at.second()
        );
        (system, shown)
    };
    let v = cert.validity();
    Ok(Validity {
        not_before: time(&v.not_before),
        not_after: time(&v.not_after),
    })
}

/// A PEM syntax problem, described without quoting the file (a key file's lines are secret).
fn pem_problem(path: &Path, e: &pem::Error) -> String {
    let what = match e {
        pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line",
        pem::Error::IllegalSectionStart { .. } => "a malformed PEM BEGIN line",
        pem::Error::Base64Decode(_) => "a PEM section is not valid base64",
        pem::Error::SectionTooLarge => "a PEM section is too large",
        _ => "not a PEM file",
    };
    format!("{}: {what}", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SignatureAlgorithm,
        PKCS_ECDSA_P256_SHA256, PKCS_RSA_SHA256,
    };
    use rustls::SupportedProtocolVersion;

    /// A directory of test files, removed at the end.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let dir =
                std::env::temp_dir().join(format!("wharf-tls-files-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }

        fn write(&self, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, content).unwrap();
            path
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A CA that issues server certificates.
    struct Ca {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    impl Ca {
        fn new(name: &str) -> Ca {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let cert = params.self_signed(&key).unwrap();
            Ca { cert, key }
        }

        /// A `localhost` certificate with a new key of `alg`, valid from `from` to `to`
        /// (years); PEM certificate and PKCS#8 key.
        fn issue(&self, alg: &'static SignatureAlgorithm, from: i32, to: i32) -> (String, String) {
            let key = KeyPair::generate_for(alg).unwrap();
            let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
            params.not_before = rcgen::date_time_ymd(from, 1, 1);
            params.not_after = rcgen::date_time_ymd(to, 1, 1);
            let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
            (cert.pem(), key.serialize_pem())
        }

        fn server(&self) -> (String, String) {
            self.issue(&PKCS_ECDSA_P256_SHA256, 2000, 4000)
        }
    }

    fn config(cert: &Path, key: &Path) -> TlsConfig {
        TlsConfig {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            client_ca: None,
            client_auth: ClientAuth::default(),
            min_version: TlsVersion::default(),
            alpn: None,
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 64,
        }
    }

    /// The errors of loading `config`, which must fail.
    fn errors(config: &TlsConfig) -> Vec<TlsFileError> {
        match load(config, &[]) {
            Ok(_) => panic!("{config:?} loaded"),
            Err(e) => e,
        }
    }

    fn one_error(config: &TlsConfig) -> TlsFileError {
        let errors = errors(config);
        assert_eq!(errors.len(), 1, "{errors:?}");
        errors.into_iter().next().unwrap()
    }

    #[test]
    fn a_good_pair_loads_with_the_settings() {
        let dir = Dir::new("good");
        let (cert, key) = Ca::new("ca").server();
        let mut c = config(&dir.write("s.pem", cert), &dir.write("s.key", key));
        let loaded = load(&c, &["http/1.1"]).unwrap();
        assert_eq!(loaded.server_config.alpn_protocols, [b"http/1.1".to_vec()]);
        assert_eq!(loaded.files, [c.cert.clone(), c.key.clone()]);
        assert_eq!(loaded.client_auth, None);
        assert_eq!(loaded.handshake_timeout, Duration::from_secs(10));
        assert!(loaded.not_after > SystemTime::now());
        c.alpn = Some(vec!["h2".into(), "http/1.1".into()]);
        let loaded = load(&c, &["http/1.1"]).unwrap();
        assert_eq!(
            loaded.server_config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        c.alpn = Some(vec![]);
        assert!(load(&c, &["http/1.1"])
            .unwrap()
            .server_config
            .alpn_protocols
            .is_empty());
    }

    /// A rustls client for `localhost` trusting `ca`, limited to `versions`, with a client
    /// certificate when given one.
    fn client(
        ca: &Ca,
        versions: &[&'static SupportedProtocolVersion],
        cert: Option<(String, String)>,
    ) -> rustls::ClientConfig {
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert.der().clone()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
        match cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
        }
    }

    /// Runs a handshake in memory; the server's error, else the client's.
    fn handshake(server: Arc<ServerConfig>, client: rustls::ClientConfig) -> Result<(), String> {
        use rustls::Connection;
        let name = "localhost".try_into().unwrap();
        let mut client =
            Connection::from(rustls::ClientConnection::new(Arc::new(client), name).unwrap());
        let mut server = Connection::from(rustls::ServerConnection::new(server).unwrap());
        /// Moves what `from` has to send to `to`, which processes it.
        fn send(from: &mut Connection, to: &mut Connection, to_name: &str) -> Result<(), String> {
            let mut bytes = Vec::new();
            while from.wants_write() {
                from.write_tls(&mut bytes).unwrap();
            }
            let mut input = &bytes[..];
            while !input.is_empty() {
                to.read_tls(&mut input).unwrap();
                to.process_new_packets()
                    .map_err(|e| format!("{to_name}: {e}"))?;
            }
            Ok(())
        }
        for _ in 0..10 {
            send(&mut client, &mut server, "server")?;
            send(&mut server, &mut client, "client")?;
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
        }
        Err("the handshake did not finish".into())
    }

    #[test]
    fn the_versions_follow_min_version() {
        let dir = Dir::new("versions");
        let ca = Ca::new("ca");
        let (cert, key) = ca.server();
        let mut c = config(&dir.write("s.pem", cert), &dir.write("s.key", key));
        let tls12 = || client(&ca, &[&rustls::version::TLS12], None);
        let tls13 = || client(&ca, &[&rustls::version::TLS13], None);
        let server = load(&c, &[]).unwrap().server_config;
        handshake(Arc::clone(&server), tls12()).unwrap();
        handshake(server, tls13()).unwrap();
        c.min_version = TlsVersion::Tls13;
        let server = load(&c, &[]).unwrap().server_config;
        handshake(Arc::clone(&server), tls13()).unwrap();
        let refused = handshake(server, tls12()).unwrap_err();
        assert!(
            refused.contains("server: peer is incompatible"),
            "{refused}"
        );
    }

    #[test]
    fn missing_files_are_all_reported_by_key() {
        let dir = Dir::new("missing");
        let mut c = config(&dir.0.join("nope.pem"), &dir.0.join("nope.key"));
        c.client_ca = Some(dir.0.join("nope-ca.pem"));
        let errors = errors(&c);
        let keys: Vec<_> = errors.iter().map(|e| e.key).collect();
        assert_eq!(keys, ["cert", "key", "client_ca"]);
        for (e, file) in errors.iter().zip(["nope.pem", "nope.key", "nope-ca.pem"]) {
            assert!(e.message.contains(file), "{e:?}");
            assert!(e.message.contains("No such file"), "{e:?}");
        }
    }

    #[test]
    fn a_directory_or_a_fifo_is_not_read() {
        let dir = Dir::new("special");
        let (cert, _) = Ca::new("ca").server();
        let fifo = dir.0.join("fifo");
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let e = one_error(&config(&dir.write("s.pem", cert), &fifo));
        assert_eq!(e.key, "key");
        assert!(e.message.ends_with("fifo: not a regular file"), "{e:?}");
        let both = errors(&config(&dir.0, &fifo));
        assert_eq!(
            both[0].message,
            format!("cannot read {}: not a regular file", dir.0.display())
        );
    }

    #[test]
    fn an_oversized_file_is_refused() {
        let dir = Dir::new("big");
        let (cert, key) = Ca::new("ca").server();
        let big = format!("{cert}{}", " ".repeat(MAX_TLS_FILE_BYTES as usize));
        let e = one_error(&config(&dir.write("s.pem", big), &dir.write("s.key", key)));
        assert_eq!(e.key, "cert");
        assert!(
            e.message.ends_with("s.pem: larger than 1048576 bytes"),
            "{e:?}"
        );
    }

    #[test]
    fn files_without_what_they_should_hold() {
        let dir = Dir::new("empty");
        let (cert, key) = Ca::new("ca").server();
        let (cert, key) = (dir.write("s.pem", cert), dir.write("s.key", key));
        let empty = dir.write("empty.pem", "");
        assert_eq!(
            errors(&config(&empty, &empty)),
            [
                TlsFileError {
                    key: "cert",
                    message: format!(
                        "no certificate in {} (PEM `BEGIN CERTIFICATE` sections expected)",
                        empty.display()
                    )
                },
                TlsFileError {
                    key: "key",
                    message: format!(
                        "no private key in {} (PEM PKCS#8, SEC1 or PKCS#1 expected)",
                        empty.display()
                    )
                }
            ]
        );
        // The two files swapped: each message says what the file holds instead.
        let swapped = errors(&config(&key, &cert));
        assert!(swapped[0]
            .message
            .ends_with("(it holds a private key: is it the `key` file?)"));
        assert!(swapped[1]
            .message
            .ends_with("(it holds a certificate: is it the `cert` file?)"));
    }

    #[test]
    fn malformed_pem_is_described_without_quoting_the_file() {
        let dir = Dir::new("malformed");
        let (cert, key) = Ca::new("ca").server();
        let secret_line = key.lines().nth(1).unwrap().to_string();
        let cut = key.replace("-----END PRIVATE KEY-----", "");
        let e = one_error(&config(
            &dir.write("s.pem", &cert),
            &dir.write("s.key", &cut),
        ));
        assert_eq!(e.key, "key");
        assert!(
            e.message.ends_with("s.key: a PEM section has no END line"),
            "{e:?}"
        );
        let garbled = key.replace(&secret_line, &format!("{secret_line}!*"));
        let e = one_error(&config(
            &dir.write("s.pem", &cert),
            &dir.write("s.key", garbled),
        ));
        assert!(
            e.message
                .ends_with("s.key: a PEM section is not valid base64"),
            "{e:?}"
        );
        assert!(!e.message.contains(&secret_line));
        // A PEM section whose content is not a certificate.
        let not_der = "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n";
        let e = one_error(&config(
            &dir.write("bad.pem", not_der),
            &dir.write("s.key", &key),
        ));
        assert_eq!(e.key, "cert");
        assert!(
            e.message
                .contains("bad.pem is not a valid X.509 certificate"),
            "{e:?}"
        );
    }

    #[test]
    fn an_encrypted_key_is_named_as_such() {
        let dir = Dir::new("encrypted");
        let (cert, _) = Ca::new("ca").server();
        let encrypted = "-----BEGIN ENCRYPTED PRIVATE KEY-----\naGVsbG8=\n\
                         -----END ENCRYPTED PRIVATE KEY-----\n";
        let e = one_error(&config(
            &dir.write("s.pem", cert),
            &dir.write("s.key", encrypted),
        ));
        assert_eq!(e.key, "key");
        assert!(e.message.contains("it holds an encrypted key"), "{e:?}");
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let dir = Dir::new("mismatch");
        let ca = Ca::new("ca");
        let (cert, _) = ca.server();
        let (_, other_key) = ca.server();
        let c = config(&dir.write("s.pem", cert), &dir.write("s.key", other_key));
        assert_eq!(
            one_error(&c),
            TlsFileError {
                key: "key",
                message: format!(
                    "key in {} does not match the certificate in {}",
                    c.key.display(),
                    c.cert.display()
                )
            }
        );
    }

    #[test]
    fn a_chain_out_of_order_is_named() {
        let dir = Dir::new("order");
        let ca = Ca::new("ca");
        let (cert, key) = ca.server();
        let chain = format!("{}{cert}", ca.cert.pem());
        let e = one_error(&config(
            &dir.write("s.pem", chain),
            &dir.write("s.key", key),
        ));
        assert_eq!(e.key, "key");
        assert!(
            e.message.ends_with(
                "but certificate 2 of the chain; the server's certificate must come first"
            ),
            "{e:?}"
        );
    }

    #[test]
    fn a_chain_with_its_intermediate_loads() {
        let dir = Dir::new("chain");
        let ca = Ca::new("ca");
        let (cert, key) = ca.server();
        let chain = format!("{cert}{}", ca.cert.pem());
        load(
            &config(&dir.write("s.pem", chain), &dir.write("s.key", key)),
            &[],
        )
        .unwrap();
    }

    #[test]
    fn expired_and_not_yet_valid_certificates_are_refused() {
        let dir = Dir::new("validity");
        let ca = Ca::new("ca");
        let (cert, key) = ca.issue(&PKCS_ECDSA_P256_SHA256, 2019, 2020);
        let c = config(&dir.write("old.pem", cert), &dir.write("old.key", key));
        assert_eq!(
            one_error(&c),
            TlsFileError {
                key: "cert",
                message: format!(
                    "certificate in {} expired on 2020-01-01 00:00:00 UTC",
                    c.cert.display()
                )
            }
        );
        let (cert, key) = ca.issue(&PKCS_ECDSA_P256_SHA256, 3000, 3001);
        let c = config(&dir.write("new.pem", cert), &dir.write("new.key", key));
        let e = one_error(&c);
        assert_eq!(e.key, "cert");
        assert!(
            e.message
                .ends_with("new.pem is not valid before 3000-01-01 00:00:00 UTC"),
            "{e:?}"
        );
        // An expired certificate further up the chain is named by its place.
        let (cert, key) = ca.server();
        let (old, _) = ca.issue(&PKCS_ECDSA_P256_SHA256, 2019, 2020);
        let c = config(
            &dir.write("c.pem", format!("{cert}{old}")),
            &dir.write("c.key", key),
        );
        assert!(one_error(&c)
            .message
            .starts_with("certificate 2 of the chain in"));
    }

    /// `openssl pkey -traditional`: the SEC1 or PKCS#1 form of a PKCS#8 key. `None` (the test
    /// is skipped) without openssl, outside CI (whose script installs it).
    fn traditional(dir: &Dir, pkcs8: &str) -> Option<String> {
        let input = dir.write("pkcs8.key", pkcs8);
        let output = match std::process::Command::new("openssl")
            .args(["pkey", "-traditional", "-in"])
            .arg(&input)
            .output()
        {
            Ok(output) => output,
            Err(e) if std::env::var_os("CI").is_none() => {
                eprintln!("skipped: cannot run openssl: {e}");
                return None;
            }
            Err(e) => panic!("cannot run openssl: {e}"),
        };
        assert!(output.status.success(), "{output:?}");
        Some(String::from_utf8(output.stdout).unwrap())
    }

    #[test]
    fn every_key_format_loads() {
        let dir = Dir::new("formats");
        let ca = Ca::new("ca");
        for (alg, traditional_label) in [
            (&PKCS_ECDSA_P256_SHA256, "EC PRIVATE KEY"),
            (&PKCS_RSA_SHA256, "RSA PRIVATE KEY"),
        ] {
            let (cert, pkcs8) = ca.issue(alg, 2000, 4000);
            let cert = dir.write("s.pem", cert);
            assert!(pkcs8.starts_with("-----BEGIN PRIVATE KEY-----"));
            load(&config(&cert, &dir.write("s.key", &pkcs8)), &[]).unwrap();
            let Some(key) = traditional(&dir, &pkcs8) else {
                return;
            };
            assert!(key.contains(traditional_label), "{key}");
            load(&config(&cert, &dir.write("s.key", key)), &[]).unwrap();
        }
    }

    #[test]
    fn client_authentication_required_or_optional() {
        let dir = Dir::new("clients");
        let server_ca = Ca::new("server-ca");
        let (cert, key) = server_ca.server();
        let clients = Ca::new("client-ca");
        let strangers = Ca::new("other-ca");
        let mut c = config(&dir.write("s.pem", cert), &dir.write("s.key", key));
        c.client_ca = Some(dir.write("clients.pem", clients.cert.pem()));
        let tls13 = [&rustls::version::TLS13];
        let with = |ca: &Ca| client(&server_ca, &tls13, Some(ca.server()));
        let without = || client(&server_ca, &tls13, None);

        let loaded = load(&c, &[]).unwrap();
        assert_eq!(loaded.client_auth, Some(ClientAuth::Required));
        assert_eq!(loaded.files.len(), 3);
        let server = loaded.server_config;
        handshake(Arc::clone(&server), with(&clients)).unwrap();
        let refused = handshake(Arc::clone(&server), without()).unwrap_err();
        assert!(
            refused.contains("server: peer sent no certificates"),
            "{refused}"
        );
        let refused = handshake(server, with(&strangers)).unwrap_err();
        assert!(refused.contains("UnknownIssuer"), "{refused}");

        c.client_auth = ClientAuth::Optional;
        let loaded = load(&c, &[]).unwrap();
        assert_eq!(loaded.client_auth, Some(ClientAuth::Optional));
        let server = loaded.server_config;
        handshake(Arc::clone(&server), with(&clients)).unwrap();
        handshake(Arc::clone(&server), without()).unwrap();
        let refused = handshake(server, with(&strangers)).unwrap_err();
        assert!(refused.contains("UnknownIssuer"), "{refused}");
    }

    #[test]
    fn a_client_ca_file_without_a_usable_certificate_is_refused() {
        let dir = Dir::new("client-ca");
        let ca = Ca::new("ca");
        let (cert, key) = ca.server();
        let mut c = config(&dir.write("s.pem", cert), &dir.write("s.key", &key));
        c.client_ca = Some(dir.write("ca.pem", &key));
        let e = one_error(&c);
        assert_eq!(e.key, "client_ca");
        assert!(e.message.starts_with("no certificate in"), "{e:?}");
        let (old, _) = ca.issue(&PKCS_ECDSA_P256_SHA256, 2019, 2020);
        c.client_ca = Some(dir.write("ca.pem", old));
        let e = one_error(&c);
        assert!(e.message.contains("ca.pem expired on 2020-01-01"), "{e:?}");
    }

    #[test]
    fn the_fingerprint_follows_content_and_settings_only() {
        let dir = Dir::new("fingerprint");
        let ca = Ca::new("ca");
        let (cert, key) = ca.server();
        let mut c = config(&dir.write("s.pem", &cert), &dir.write("s.key", &key));
        let fingerprint = |c: &TlsConfig| load(c, &[]).unwrap().fingerprint;
        let first = fingerprint(&c);
        assert_eq!(
            first,
            fingerprint(&c),
            "the same files, the same fingerprint"
        );
        assert!(!first.contains(key.lines().nth(1).unwrap()));
        let (cert2, key2) = ca.server();
        dir.write("s.pem", &cert2);
        dir.write("s.key", &key2);
        let rotated = fingerprint(&c);
        assert_ne!(first, rotated, "new files, a new fingerprint");
        c.alpn = Some(vec!["x".into()]);
        assert_ne!(rotated, fingerprint(&c));
        c.alpn = None;
        c.handshake_timeout = Duration::from_secs(3);
        assert_ne!(rotated, fingerprint(&c));
    }
}
