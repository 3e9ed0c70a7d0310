//! The TLS layer over the in-memory pipe, with a real rustls client on the other side.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use super::{TlsConn, TlsError, TlsSettings};
use crate::conn::Conn;
use crate::context::Context;
use crate::service::Service;
use crate::testing::{self, block_on, Client};

/// A CA, a `localhost` server certificate and client certificates, all made here.
struct Pki {
    ca_cert: CertificateDer<'static>,
    ca: Certificate,
    ca_key: KeyPair,
    server: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "test CA");
        let key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap();
        let mut pki = Pki {
            ca_cert: ca.der().clone(),
            ca,
            ca_key: key,
            server: (
                Vec::new(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(vec![])),
            ),
        };
        pki.server = pki.leaf(
            vec![SanType::DnsName("localhost".try_into().unwrap())],
            None,
        );
        pki
    }

    fn leaf(
        &self,
        sans: Vec<SanType>,
        cn: Option<&str>,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let der = PrivatePkcs8KeyDer::from(key.serialize_der());
        (vec![cert.der().clone()], der.into())
    }

    fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_cert.clone()).unwrap();
        Arc::new(roots)
    }

    /// Server settings; with `client_ca`, client certificates from the CA are required.
    fn settings(&self, client_ca: bool, allow: &[&str]) -> TlsSettings {
        let builder = rustls::ServerConfig::builder();
        let builder = if client_ca {
            let verifier = WebPkiClientVerifier::builder(self.roots()).build().unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let (chain, key) = (self.server.0.clone(), self.server.1.clone_key());
        TlsSettings {
            server_config: Arc::new(builder.with_single_cert(chain, key).unwrap()),
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 64,
            allow_identities: allow.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn client(&self, cert: Option<&str>) -> Arc<rustls::ClientConfig> {
        let builder = rustls::ClientConfig::builder().with_root_certificates(self.roots());
        Arc::new(match cert {
            Some(name) => {
                let (chain, key) =
                    self.leaf(vec![SanType::DnsName(name.try_into().unwrap())], None);
                builder.with_client_auth_cert(chain, key).unwrap()
            }
            None => builder.with_no_client_auth(),
        })
    }
}

/// Echoes every read back uppercased, answers `who` with the identity, until end of stream,
/// then shuts down.
struct Upper;

#[async_trait::async_trait(?Send)]
impl Service for Upper {
    async fn serve<C: Conn + 'static>(&self, mut conn: C, cx: &Context) -> io::Result<()> {
        loop {
            let (res, mut buf) = conn.read(Vec::with_capacity(8192)).await;
            if res? == 0 {
                return conn.shutdown().await;
            }
            if buf == b"who" {
                buf = cx.identity().unwrap_or("nobody").as_bytes().to_vec();
            }
            buf.make_ascii_uppercase();
            let (res, _) = conn.write_all(buf).await;
            res?;
        }
    }
}

type ClientTls = TlsConn<Client, rustls::ClientConnection>;

async fn ask(tls: &mut ClientTls, what: &[u8]) -> Vec<u8> {
    let mut answer = Vec::new();
    let (res, _) = tls.write_all(what.to_vec()).await;
    if res.is_err() {
        // The service already closed: no answer.
        return answer;
    }
    while answer.len() < what.len().max(1) {
        let (res, buf) = tls.read(Vec::with_capacity(65536)).await;
        if res.unwrap() == 0 {
            break;
        }
        answer.extend(buf);
        if what == b"who" {
            break;
        }
    }
    answer
}

async fn read_to_end(tls: &mut ClientTls) -> io::Result<Vec<u8>> {
    let mut all = Vec::new();
    loop {
        let (res, buf) = tls.read(Vec::with_capacity(65536)).await;
        if res? == 0 {
            return Ok(all);
        }
        all.extend(buf);
    }
}

#[test]
fn a_service_is_served_over_tls_and_close_notify_ends_both_ways() {
    let pki = Pki::new();
    block_on(async {
        let (conn, client) = testing::pipe();
        let server = testing::spawn_tls(Upper, conn, pki.settings(false, &[]));
        let mut tls = testing::tls_connect(client, pki.client(None), "localhost")
            .await
            .unwrap();
        assert_eq!(ask(&mut tls, b"hello").await, b"HELLO");
        assert_eq!(ask(&mut tls, b"who").await, b"NOBODY");
        tls.shutdown().await.unwrap();
        assert_eq!(read_to_end(&mut tls).await.unwrap(), b"");
        server.await.unwrap().unwrap();
    });
}

/// Reads to end of stream, then answers with the length and an FNV-1a hash of what it read.
struct Digest;

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

#[async_trait::async_trait(?Send)]
impl Service for Digest {
    async fn serve<C: Conn + 'static>(&self, mut conn: C, _: &Context) -> io::Result<()> {
        let mut all = Vec::new();
        loop {
            let (res, buf) = conn.read(Vec::with_capacity(5000)).await;
            if res? == 0 {
                break;
            }
            all.extend(buf);
        }
        let answer = format!("{} {:x}", all.len(), fnv(&all));
        let (res, _) = conn.write_all(answer.into_bytes()).await;
        res?;
        conn.shutdown().await
    }
}

#[test]
fn bulk_data_crosses_a_pipe_smaller_than_a_record_intact() {
    let pki = Pki::new();
    block_on(async {
        // 1000 bytes per direction: every 16 KiB record arrives in pieces.
        let (conn, client) = testing::pipe_with_capacity(1000);
        let server = testing::spawn_tls(Digest, conn, pki.settings(false, &[]));
        let mut tls = testing::tls_connect(client, pki.client(None), "localhost")
            .await
            .unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for chunk in data.chunks(100_000) {
            let (res, _) = tls.write_all(chunk.to_vec()).await;
            res.unwrap();
        }
        tls.shutdown().await.unwrap();
        let answer = read_to_end(&mut tls).await.unwrap();
        assert_eq!(
            String::from_utf8(answer).unwrap(),
            format!("{} {:x}", data.len(), fnv(&data))
        );
        server.await.unwrap().unwrap();
    });
}

#[test]
fn try_read_hands_out_decrypted_bytes_and_sees_close_notify() {
    let pki = Pki::new();
    block_on(async {
        let (mut conn, client) = testing::pipe();
        let settings = pki.settings(false, &[]);
        let server = tokio::task::spawn_local(async move {
            let cx = conn.context();
            let _ = &mut conn;
            // Handshake by hand, to look at try_read on the session.
            let session = rustls::ServerConnection::new(settings.server_config).unwrap();
            let mut tls = TlsConn::new(conn, session);
            tls.handshake().await.unwrap();
            let mut buf = Vec::with_capacity(64);
            while tls.try_read(&mut buf).unwrap().is_none() {
                testing::yield_now().await;
            }
            assert_eq!(buf, b"ping");
            let mut rest = Vec::with_capacity(64);
            loop {
                match tls.try_read(&mut rest).unwrap() {
                    Some(0) => break,
                    Some(_) => panic!("unexpected data"),
                    None => testing::yield_now().await,
                }
            }
            assert!(tls.peer_finished_sending());
            drop(cx);
        });
        let mut tls = testing::tls_connect(client, pki.client(None), "localhost")
            .await
            .unwrap();
        let (res, _) = tls.write_all(b"ping".to_vec()).await;
        res.unwrap();
        tls.shutdown().await.unwrap();
        server.await.unwrap();
    });
}

#[test]
fn send_file_goes_through_the_session() {
    let pki = Pki::new();
    struct SendFile(std::path::PathBuf);
    #[async_trait::async_trait(?Send)]
    impl Service for SendFile {
        async fn serve<C: Conn + 'static>(&self, mut conn: C, _: &Context) -> io::Result<()> {
            let file = std::fs::File::open(&self.0)?;
            assert_eq!(conn.send_file(&file, 10, 200_000).await?, 199_990);
            conn.shutdown().await
        }
    }
    let path = std::env::temp_dir().join(format!("wharf-tls-send-file-{}", std::process::id()));
    let content: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, &content).unwrap();
    block_on(async {
        let (conn, client) = testing::pipe_with_capacity(4096);
        let server = testing::spawn_tls(SendFile(path.clone()), conn, pki.settings(false, &[]));
        let mut tls = testing::tls_connect(client, pki.client(None), "localhost")
            .await
            .unwrap();
        assert!(read_to_end(&mut tls).await.unwrap() == content[10..]);
        server.await.unwrap().unwrap();
    });
    std::fs::remove_file(path).unwrap();
}

#[test]
fn the_client_certificate_names_the_identity_and_allow_identities_refuses_others() {
    let pki = Pki::new();
    block_on(async {
        for (name, served) in [("ops", true), ("dev", false)] {
            let (conn, client) = testing::pipe();
            let server = testing::spawn_tls(Upper, conn, pki.settings(true, &["ops"]));
            let mut tls = testing::tls_connect(client, pki.client(Some(name)), "localhost")
                .await
                .unwrap();
            let answer = ask(&mut tls, b"who").await;
            if served {
                assert_eq!(answer, b"OPS");
            } else {
                assert_eq!(answer, b"", "{name} was served");
            }
            tls.shutdown().await.unwrap();
            server.await.unwrap().unwrap();
        }
    });
}

#[test]
fn a_required_client_certificate_that_is_missing_fails_the_handshake() {
    let pki = Pki::new();
    block_on(async {
        let (conn, client) = testing::pipe();
        let server = testing::spawn_tls(Upper, conn, pki.settings(true, &[]));
        // TLS 1.3: the client finishes first and learns of the refusal on its first read.
        let outcome = async {
            let mut tls = testing::tls_connect(client, pki.client(None), "localhost").await?;
            let (res, _) = tls.read(Vec::with_capacity(64)).await;
            res.map_err(TlsError::Io)
        };
        match outcome.await {
            Ok(n) => panic!("served without a certificate ({n} bytes)"),
            Err(e) => assert!(e.to_string().contains("CertificateRequired"), "{e}"),
        }
        server.await.unwrap().unwrap();
    });
}

#[test]
fn plaintext_to_a_tls_service_gets_an_alert_and_the_end() {
    let pki = Pki::new();
    block_on(async {
        let (conn, client) = testing::pipe();
        let server = testing::spawn_tls(Upper, conn, pki.settings(false, &[]));
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = client.read_to_end().await;
        // One TLS alert record (content type 21), nothing of the service.
        assert_eq!(answer.first(), Some(&21), "{answer:?}");
        server.await.unwrap().unwrap();
    });
}

#[test]
fn a_silent_client_times_out_and_handshakes_beyond_the_bound_wait_for_a_slot() {
    let pki = Pki::new();
    block_on(async {
        let mut settings = pki.settings(false, &[]);
        settings.max_handshakes = 1;
        settings.handshake_timeout = Duration::from_secs(30);
        let tls = Arc::new(super::Tls::new(Upper, settings));

        // A holds the worker's only slot by saying nothing.
        let (conn_a, client_a) = testing::pipe();
        let server_a = testing::spawn(Arc::clone(&tls), conn_a);
        testing::yield_now().await;
        // B waits: its ClientHello is not even read.
        let (conn_b, client_b) = testing::pipe();
        let server_b = testing::spawn(Arc::clone(&tls), conn_b);
        let connect_b = tokio::task::spawn_local(async move {
            testing::tls_connect(client_b, pki.client(None), "localhost").await
        });
        for _ in 0..50 {
            testing::yield_now().await;
        }
        assert!(
            !connect_b.is_finished(),
            "B handshook while A held the only slot"
        );
        // A leaves: its slot goes to B, which completes.
        drop(client_a);
        server_a.await.unwrap().unwrap();
        let mut b = connect_b.await.unwrap().unwrap();
        assert_eq!(ask(&mut b, b"hi").await, b"HI");
        drop(b);
        server_b.await.unwrap().unwrap();
    });

    let pki = Pki::new();
    block_on(async {
        let mut settings = pki.settings(false, &[]);
        settings.handshake_timeout = Duration::from_millis(50);
        let (conn, client) = testing::pipe();
        let server = testing::spawn_tls(Upper, conn, settings);
        // The service gives up on its own: the connection ends with nothing sent.
        assert_eq!(client.read_to_end().await, b"");
        server.await.unwrap().unwrap();
    });
}
