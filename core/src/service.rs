//! The one seam between the server machinery and a protocol: [`Service`].
//!
//! A plugin implements `serve` once, generically over the connection type, and the framework
//! type-erases it per backend with [`DynService`]. Dynamic dispatch (and one boxed future) happens
//! once per connection, never per read or write.

use std::future::Future;
use std::io;
use std::pin::Pin;

use crate::conn::Conn;
use crate::context::Context;

/// A protocol spoken over one connection.
///
/// One value serves every connection of a service on every worker, so it is `Send + Sync`;
/// the futures it returns are not `Send` and stay on the worker that accepted the connection.
#[async_trait::async_trait(?Send)]
pub trait Service: Send + Sync + 'static {
    /// Speaks the protocol on one connection until the conversation is over.
    ///
    /// - `conn` is the transport ([`Conn`]): owned-buffer reads and writes, already counted in
    ///   the service's byte metrics and bounded by its `idle_timeout`. Dropping it closes the
    ///   connection.
    /// - `cx` is what the framework knows and offers ([`Context`]): the client's address, the
    ///   drain signal (read between requests with [`Context::read_idle`], or through
    ///   [`crate::framing`], so a server restart does not wait for idle clients), request
    ///   metrics ([`Context::record_request`]) and the service's blocking threads.
    ///
    /// Return `Ok(())` when the client is done (it closed, or the protocol says the exchange is
    /// over). Returning an error closes the connection too; the error is logged at debug level,
    /// because clients vanishing mid-request is normal life for a server. At the end of a
    /// shutdown's grace period the future is dropped, which also closes the connection.
    async fn serve<C: Conn + 'static>(&self, conn: C, cx: &Context) -> io::Result<()>;
}

/// A shared service serves like the service itself (tests keep a handle on it this way).
#[async_trait::async_trait(?Send)]
impl<S: Service> Service for std::sync::Arc<S> {
    async fn serve<C: Conn + 'static>(&self, conn: C, cx: &Context) -> io::Result<()> {
        S::serve(self, conn, cx).await
    }
}

/// The future a type-erased service returns for one connection.
pub type ServeFuture<'a> = Pin<Box<dyn Future<Output = io::Result<()>> + 'a>>;

/// A [`Service`] with its connection type fixed, so services of different plugins can sit in one
/// list. Implemented for every `Service`; backends hold `Arc<dyn DynService<TheirConn>>`.
pub trait DynService<C>: Send + Sync {
    /// Serves one connection.
    fn serve_dyn<'a>(&'a self, conn: C, cx: &'a Context) -> ServeFuture<'a>;
}

impl<S: Service, C: Conn + 'static> DynService<C> for S {
    fn serve_dyn<'a>(&'a self, conn: C, cx: &'a Context) -> ServeFuture<'a> {
        self.serve(conn, cx)
    }
}
