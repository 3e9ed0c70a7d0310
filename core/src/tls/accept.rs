//! [`Tls`]: any [`Service`] behind a TLS handshake, the way the framework serves a service
//! that has `[services.<name>.tls]`.
//!
//! For each connection, in order:
//! 1. wait for one of the worker's `max_handshakes` slots (per worker, so a flood on one
//!    worker takes nothing from the others, and its memory is bounded: a waiting connection
//!    has no TLS state and is not read);
//! 2. handshake, the whole of 1 and 2 within `handshake_timeout` of accept, and abandoned at
//!    once when the server starts stopping;
//! 3. count the result in `wharf_tls_handshakes_total{result}` (and the time in
//!    `wharf_tls_handshake_duration_seconds`), release the slot;
//! 4. take the client's identity from its verified certificate ([`super::identity`]) into
//!    [`Context::set_identity`], and refuse an identity outside `allow_identities`
//!    (`wharf_connections_rejected_total{reason="identity"}`, `close_notify`, closed);
//! 5. serve the plugin over the session ([`TlsConn`]), which sits above the byte counters:
//!    they count ciphertext, the bytes on the wire.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use thread_local::ThreadLocal;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::{debug, info};

use super::conn::{TlsConn, TlsError};
use super::files::LoadedTls;
use super::identity;
use crate::config::ServiceConfig;
use crate::conn::Conn;
use crate::context::Context;
use crate::metrics::{handshake, TlsSeries};
use crate::service::Service;

/// What a service generation's TLS runs with.
#[derive(Clone)]
pub struct TlsSettings {
    /// Certificate, key, versions, ALPN, client verification.
    pub server_config: Arc<rustls::ServerConfig>,
    /// From accept to an established session.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once per worker (at least 1).
    pub max_handshakes: usize,
    /// Identities allowed; empty allows every client the handshake accepts.
    pub allow_identities: Vec<String>,
}

impl TlsSettings {
    /// The settings of a service whose config is `config` and whose TLS files are `loaded`.
    pub fn new(loaded: &LoadedTls, config: &ServiceConfig) -> Self {
        TlsSettings {
            server_config: Arc::clone(&loaded.server_config),
            handshake_timeout: loaded.handshake_timeout,
            max_handshakes: config.tls.as_ref().map_or(64, |t| t.max_handshakes),
            allow_identities: config.allow_identities.clone(),
        }
    }
}

/// `S` served over TLS: handshake, identity, then `S::serve` on the session.
pub struct Tls<S> {
    inner: S,
    settings: TlsSettings,
    /// Each worker thread's handshake slots.
    slots: ThreadLocal<Semaphore>,
}

impl<S> Tls<S> {
    /// `inner` behind a TLS handshake with `settings`.
    pub fn new(inner: S, settings: TlsSettings) -> Self {
        Tls {
            inner,
            settings,
            slots: ThreadLocal::new(),
        }
    }

    /// Handshakes `conn` (waiting for a slot first) within the handshake timeout.
    async fn establish<C: Conn>(
        &self,
        conn: C,
        accepted: Instant,
    ) -> Result<TlsConn<C, rustls::ServerConnection>, &'static str> {
        let run = async {
            let slots = self
                .slots
                .get_or(|| Semaphore::new(self.settings.max_handshakes.max(1)));
            let _slot = slots.acquire().await.map_err(|_| handshake::OTHER)?;
            let session = rustls::ServerConnection::new(Arc::clone(&self.settings.server_config))
                .map_err(|_| handshake::OTHER)?;
            let mut tls = TlsConn::new(conn, session);
            match tls.handshake().await {
                Ok(()) => Ok(tls),
                Err(e) => {
                    debug!(error = %e, "TLS handshake failed");
                    Err(classify(&e))
                }
            }
        };
        let deadline = accepted + self.settings.handshake_timeout;
        tokio::time::timeout_at(deadline, run)
            .await
            .unwrap_or(Err(handshake::TIMEOUT))
    }
}

/// The `result` label of a failed handshake.
fn classify(e: &TlsError) -> &'static str {
    use rustls::{Error, PeerIncompatible as P};
    match e {
        TlsError::Io(e) => match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted => handshake::CLOSED,
            io::ErrorKind::TimedOut => handshake::TIMEOUT,
            _ => handshake::OTHER,
        },
        TlsError::Tls(e) => match e {
            Error::NoCertificatesPresented => handshake::NO_CERTIFICATE,
            Error::InvalidCertificate(_) => handshake::BAD_CERTIFICATE,
            Error::PeerIncompatible(
                P::Tls12NotOffered
                | P::Tls12NotOfferedOrEnabled
                | P::SupportedVersionsExtensionRequired
                | P::ServerDoesNotSupportTls12Or13,
            ) => handshake::VERSION,
            Error::AlertReceived(_) => handshake::ALERT,
            _ => handshake::PROTOCOL,
        },
    }
}

/// Counts a handshake once: its result, or `cancelled` if the connection's task is dropped
/// first (the end of a shutdown's grace period).
struct HandshakeRecord<'a> {
    series: Option<&'a TlsSeries>,
    accepted: Instant,
    done: bool,
}

impl HandshakeRecord<'_> {
    fn record(&mut self, result: &'static str) {
        if let Some(series) = self.series.filter(|_| !self.done) {
            series.record_handshake(result, self.accepted.elapsed());
        }
        self.done = true;
    }
}

impl Drop for HandshakeRecord<'_> {
    fn drop(&mut self) {
        self.record(handshake::CANCELLED);
    }
}

#[async_trait::async_trait(?Send)]
impl<S: Service> Service for Tls<S> {
    async fn serve<C: Conn + 'static>(&self, conn: C, cx: &Context) -> io::Result<()> {
        let accepted = Instant::now();
        let mut record = HandshakeRecord {
            series: cx.tls_series(),
            accepted,
            done: false,
        };
        let established = tokio::select! {
            established = self.establish(conn, accepted) => established,
            // Nothing was asked yet: a stopping server does not wait for handshakes.
            _ = cx.stopping() => Err(handshake::CANCELLED),
        };
        let mut tls = match established {
            Ok(tls) => tls,
            Err(result) => {
                record.record(result);
                debug!(peer = %cx.peer(), result, "TLS handshake did not complete");
                return Ok(());
            }
        };
        record.record(handshake::OK);

        let leaf = tls.session().peer_certificates().and_then(|c| c.first());
        if let Some(identity) = leaf.and_then(|c| identity::of_certificate(c)) {
            cx.set_identity(identity);
        }
        let allowed = &self.settings.allow_identities;
        if !allowed.is_empty()
            && !cx
                .identity()
                .is_some_and(|id| allowed.iter().any(|a| a == id))
        {
            if let Some(series) = cx.tls_series() {
                series.rejected_identity.increment(1);
            }
            info!(
                service = cx.service(),
                peer = %cx.peer(),
                identity = cx.identity().unwrap_or("(none)"),
                "connection refused: identity not in allow_identities"
            );
            return tls.shutdown().await;
        }
        self.inner.serve(tls, cx).await
    }
}
