//! The one seam between the server machinery and a protocol: [`Service`].
//!
//! A plugin implements `serve` once, generically over the connection type, and the framework
//! type-erases it per backend with [`DynService`]. Dynamic dispatch (and one boxed future) happens
//! once per connection, never per read or write.

use std::future::Future;
use std::io;
use std::pin::Pin;

use crate::conn::Conn;

/// A protocol spoken over one connection.
///
/// One value serves every connection of a service on every worker, so it is `Send + Sync`;
/// the futures it returns are not `Send` and stay on the worker that accepted the connection.
/// Returning an error closes the connection; the error is logged at debug level, because
/// clients vanishing mid-request is normal life for a server.
#[async_trait::async_trait(?Send)]
pub trait Service: Send + Sync + 'static {
    /// Speaks the protocol until the conversation is over. Dropping the connection closes it.
    async fn serve<C: Conn + 'static>(&self, conn: C) -> io::Result<()>;
}

/// The future a type-erased service returns for one connection.
pub type ServeFuture<'a> = Pin<Box<dyn Future<Output = io::Result<()>> + 'a>>;

/// A [`Service`] with its connection type fixed, so services of different plugins can sit in one
/// list. Implemented for every `Service`; backends hold `Arc<dyn DynService<TheirConn>>`.
pub trait DynService<C>: Send + Sync {
    /// Serves one connection.
    fn serve_dyn(&self, conn: C) -> ServeFuture<'_>;
}

impl<S: Service, C: Conn + 'static> DynService<C> for S {
    fn serve_dyn(&self, conn: C) -> ServeFuture<'_> {
        self.serve(conn)
    }
}
