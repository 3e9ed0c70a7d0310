//! The client identity rule: which name a verified client certificate gives its connection.
//!
//! The certificate's first DNS subject alternative name, else its first URI SAN, else its
//! subject common name. A name that is empty or holds control characters counts as absent (it
//! would be ambiguous in logs and configs), and so does a certificate (or a SAN extension)
//! that does not parse.
//! rustls has verified the certificate (chain to `client_ca`, validity, key usage) before this
//! runs; this only reads it.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The identity `certificate` (DER) names, by the rule above.
pub fn of_certificate(certificate: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(certificate).ok()?;
    let sans: Vec<&GeneralName<'_>> = match cert.subject_alternative_name() {
        Ok(Some(ext)) => ext.value.general_names.iter().collect(),
        Ok(None) => Vec::new(),
        // A SAN extension that does not parse (or appears twice) gives no identity rather than
        // falling back to the common name: fail closed.
        Err(_) => return None,
    };
    let dns = sans.iter().find_map(|n| match n {
        GeneralName::DNSName(name) => Some(*name),
        _ => None,
    });
    let uri = || {
        sans.iter().find_map(|n| match n {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
    };
    let cn = || {
        cert.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
    };
    let name = dns.or_else(uri).or_else(cn)?;
    let usable = !name.is_empty() && !name.chars().any(char::is_control);
    usable.then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    fn cert(sans: Vec<SanType>, cn: Option<&str>) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        let mut dn = DistinguishedName::new();
        if let Some(cn) = cn {
            dn.push(DnType::CommonName, cn);
        }
        params.distinguished_name = dn;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn dns(name: &str) -> SanType {
        SanType::DnsName(name.try_into().unwrap())
    }

    fn uri(name: &str) -> SanType {
        SanType::URI(name.try_into().unwrap())
    }

    #[test]
    fn the_first_dns_name_wins_over_uris_and_the_common_name() {
        let c = cert(
            vec![uri("spiffe://x/ops"), dns("ops"), dns("dev")],
            Some("cn"),
        );
        assert_eq!(of_certificate(&c).as_deref(), Some("ops"));
    }

    #[test]
    fn without_dns_names_the_first_uri_is_the_identity() {
        let c = cert(
            vec![uri("spiffe://example.org/ops"), uri("urn:other")],
            Some("cn"),
        );
        assert_eq!(
            of_certificate(&c).as_deref(),
            Some("spiffe://example.org/ops")
        );
    }

    #[test]
    fn without_dns_or_uri_names_the_common_name_is_the_identity() {
        let ip = SanType::IpAddress([127, 0, 0, 1].into());
        assert_eq!(
            of_certificate(&cert(vec![ip], Some("alice"))).as_deref(),
            Some("alice")
        );
    }

    #[test]
    fn no_name_no_identity() {
        assert_eq!(of_certificate(&cert(vec![], None)), None);
        assert_eq!(of_certificate(&cert(vec![], Some("bad\nname"))), None);
        assert_eq!(of_certificate(b"not a certificate"), None);
    }
}
