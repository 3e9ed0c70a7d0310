//! Test certificates, made fresh in each test (never committed keys): a CA, server certificates
//! for the loopback names, client certificates carrying an identity, and deliberately broken
//! ones (expired, signed by another CA). ECDSA P-256 throughout, like the benchmarks.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A certificate and its key, written as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What a client certificate names, so tests can exercise each step of the identity rule.
pub enum Names<'a> {
    /// A DNS subject alternative name (the rule's first choice).
    Dns(&'a str),
    /// A URI subject alternative name, e.g. `spiffe://example.org/ops`.
    Uri(&'a str),
    /// Only a subject common name, no SAN.
    CommonName(&'a str),
}

/// A certificate authority that writes its files into `dir`.
pub struct Pki {
    dir: PathBuf,
    ca: Certificate,
    ca_key: KeyPair,
    ca_file: PathBuf,
}

impl Pki {
    /// A new CA named `name`; its certificate is written to `<dir>/<name>-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Pki {
        let ca_key = KeyPair::generate().expect("generating a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("wharf test CA {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = params.self_signed(&ca_key).expect("self-signing the CA");
        let ca_file = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca_file, ca.pem()).unwrap();
        Pki {
            dir: dir.to_path_buf(),
            ca,
            ca_key,
            ca_file,
        }
    }

    /// The CA certificate (PEM): what clients trust and what `client_ca` names.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// A server certificate for `localhost`, `127.0.0.1` and `::1`, valid now.
    pub fn server(&self, file_stem: &str) -> CertFiles {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        self.issue(file_stem, params)
    }

    /// A server certificate for the loopback names that expired in 2020.
    pub fn expired_server(&self, file_stem: &str) -> CertFiles {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.not_before = rcgen::date_time_ymd(2019, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        self.issue(file_stem, params)
    }

    /// A client certificate that names its holder as `names` says.
    pub fn client(&self, file_stem: &str, names: Names<'_>) -> CertFiles {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        match names {
            Names::Dns(name) => params
                .subject_alt_names
                .push(SanType::DnsName(name.try_into().expect("a DNS name"))),
            Names::Uri(uri) => params
                .subject_alt_names
                .push(SanType::URI(uri.try_into().expect("a URI"))),
            Names::CommonName(cn) => params.distinguished_name.push(DnType::CommonName, cn),
        }
        self.issue(file_stem, params)
    }

    fn issue(&self, file_stem: &str, params: CertificateParams) -> CertFiles {
        let key = KeyPair::generate().expect("generating a key");
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("signing a certificate");
        let files = CertFiles {
            cert: self.dir.join(format!("{file_stem}.pem")),
            key: self.dir.join(format!("{file_stem}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::{have_tool, TempDir};
    use std::process::Command;

    fn verify(ca: &Path, cert: &Path, purpose: &str) -> std::process::Output {
        Command::new("openssl")
            .args(["verify", "-purpose", purpose, "-CAfile"])
            .arg(ca)
            .arg(cert)
            .output()
            .unwrap()
    }

    /// The generated chain is what a real TLS stack accepts (and the expired one is not), so a
    /// TLS test that fails points at wharf, not at its certificates.
    #[test]
    fn openssl_accepts_the_generated_chain_and_rejects_the_broken_ones() {
        if !have_tool("openssl", "version") {
            return;
        }
        let dir = TempDir::new();
        let pki = Pki::new(&dir.0, "main");
        let other = Pki::new(&dir.0, "other");
        let server = pki.server("server");
        assert!(verify(pki.ca_file(), &server.cert, "sslserver")
            .status
            .success());
        for (stem, names) in [
            ("dns", Names::Dns("ops")),
            ("uri", Names::Uri("spiffe://example.org/ops")),
            ("cn", Names::CommonName("ops")),
        ] {
            let client = pki.client(stem, names);
            assert!(verify(pki.ca_file(), &client.cert, "any").status.success());
        }
        let expired = pki.expired_server("expired");
        let out = verify(pki.ca_file(), &expired.cert, "sslserver");
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("expired")
                || String::from_utf8_lossy(&out.stderr).contains("expired")
        );
        let foreign = other.server("foreign");
        assert!(!verify(pki.ca_file(), &foreign.cert, "sslserver")
            .status
            .success());
    }
}
