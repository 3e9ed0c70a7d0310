//! The compiled-in IO backends: the one place that maps a [`BackendKind`] (the list in
//! `wharf_core::config`) to its implementation crate.
//!
//! Everything else in the binary is generic over [`CompiledBackend`] or names a backend by its
//! [`BackendKind`]. This module
//!
//! - resolves `server.backend` (probing the kernel for `auto`) in [`resolve`];
//! - runs a generic job on the chosen backend's concrete type in [`dispatch`];
//! - keeps a plugin instance as each backend calls it ([`ServiceInstances`]), since a plugin's
//!   `serve` is generic over the connection type and is instantiated once per backend.
//!
//! Adding a backend: a variant in `BackendKind` with its entry in `BackendKind::ALL`, its
//! name and aliases (`as_str`, `aliases`, in `core/src/config.rs`: configs, `--backend` and
//! `bench swap --backends` take them from there); a line in the `compiled_backends!` call
//! below; a [`CompiledBackend`] impl (its probe); and its place in [`resolve`]'s `auto` order
//! and in `fallback` (the backend suggested when it cannot run).

use std::sync::Arc;

use tracing::info;
use wharf_core::backend::Backend;
use wharf_core::config::{BackendChoice, BackendKind};
use wharf_core::service::DynService;
use wharf_core::worker::ConnOf;
use wharf_core::Service;

/// A backend compiled into this binary.
pub trait CompiledBackend: Backend {
    /// Which backend this is.
    const KIND: BackendKind;

    /// Whether this backend can run here; the reason when not (worded to follow "but").
    fn probe() -> Result<(), String>;

    /// `instances`' plugin instance as this backend calls it.
    fn instance(instances: &ServiceInstances) -> Arc<dyn DynService<ConnOf<Self>>>;
}

/// A generic job to run on one backend's concrete type (see [`dispatch`]).
pub trait OnBackend {
    /// What the job returns.
    type Output;
    /// Runs the job on backend `B`.
    fn run<B: CompiledBackend>(self) -> Self::Output;
}

macro_rules! compiled_backends {
    ($($kind:ident => $backend:ty, $field:ident;)*) => {
        /// One plugin instance, as each compiled-in backend calls it.
        pub struct ServiceInstances {
            $($field: Arc<dyn DynService<ConnOf<$backend>>>,)*
        }

        impl ServiceInstances {
            /// The same `instance` for every backend.
            pub fn of<S: Service>(instance: &Arc<S>) -> Self {
                ServiceInstances {
                    $($field: Arc::clone(instance) as Arc<dyn DynService<ConnOf<$backend>>>,)*
                }
            }
        }

        /// Runs `job` on the backend `kind` names.
        pub fn dispatch<J: OnBackend>(kind: BackendKind, job: J) -> J::Output {
            match kind {
                $(BackendKind::$kind => job.run::<$backend>(),)*
            }
        }

        $(
            impl CompiledBackend for $backend {
                const KIND: BackendKind = BackendKind::$kind;

                fn probe() -> Result<(), String> {
                    probe::$field()
                }

                fn instance(instances: &ServiceInstances) -> Arc<dyn DynService<ConnOf<Self>>> {
                    Arc::clone(&instances.$field)
                }
            }
        )*
    };
}

compiled_backends! {
    Epoll => wharf_backend_epoll::Epoll, epoll;
    IoUring => wharf_backend_uring::IoUring, io_uring;
}

/// Whether each backend can run on this kernel, by its field name above.
mod probe {
    /// epoll is always there.
    pub fn epoll() -> Result<(), String> {
        Ok(())
    }

    /// io_uring may be disabled by sysctl or refused by seccomp (Docker's default profile).
    pub fn io_uring() -> Result<(), String> {
        wharf_backend_uring::probe()
    }
}

/// Whether backend `kind` can run here.
fn probe_kind(kind: BackendKind) -> Result<(), String> {
    struct Probe;
    impl OnBackend for Probe {
        type Output = Result<(), String>;
        fn run<B: CompiledBackend>(self) -> Result<(), String> {
            B::probe()
        }
    }
    dispatch(kind, Probe)
}

/// The backend [`resolve`] chose, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The backend the workers run.
    pub kind: BackendKind,
    /// Why this one: `configured`, or what `auto` found (as logged; the status page shows it).
    pub why: String,
}

/// The order `auto` tries the backends in: the one that measures better first, not the newer
/// one. On the kernels measured (6.x, see BENCHMARKS.md "auto"), the tokio-uring backend
/// matched epoll's throughput only at saturation and spent 7-15% more CPU per request below
/// it. The io_uring backend on its own driver (multishot receive, buffer ring, batching) spent
/// 0.88x-1.38x epoll's CPU per round trip in two runs on a busy machine and 1.10x-1.47x its
/// user-space instructions (BENCHMARKS.md, "The io_uring backend on the driver"): not a win.
/// Until an io_uring backend measures better, `auto` means epoll, and io_uring is there for
/// whoever asks for it.
pub const AUTO_ORDER: [BackendKind; 2] = [BackendKind::Epoll, BackendKind::IoUring];

/// Which backend the workers will run: the one configured, if it can run here (else an error
/// saying why), or for `auto` the first of [`AUTO_ORDER`] that can, logged with the reason.
pub fn resolve(choice: BackendChoice) -> Result<Resolved, String> {
    match choice {
        BackendChoice::Kind(kind) => probe_kind(kind)
            .map(|()| Resolved {
                kind,
                why: "configured".into(),
            })
            .map_err(|why| {
                format!(
                    "server.backend = \"{kind}\" but {why}; use backend = \"{}\" or \"auto\"",
                    fallback(kind)
                )
            }),
        BackendChoice::Auto => {
            let mut refused = Vec::new();
            for kind in AUTO_ORDER {
                match probe_kind(kind) {
                    Ok(()) => {
                        let why = if refused.is_empty() {
                            format!("auto: {kind} measures better here (see BENCHMARKS.md)")
                        } else {
                            format!("auto: fell back to {kind} because {}", refused.join("; "))
                        };
                        info!("backend {why}");
                        return Ok(Resolved { kind, why });
                    }
                    Err(why) => refused.push(why),
                }
            }
            Err(format!("no backend can run here: {}", refused.join("; ")))
        }
    }
}

/// The backend to suggest when `kind` cannot run.
fn fallback(kind: BackendKind) -> BackendKind {
    match kind {
        BackendKind::IoUring => BackendKind::Epoll,
        BackendKind::Epoll => BackendKind::IoUring,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_maps_to_the_backend_of_that_name() {
        struct Name;
        impl OnBackend for Name {
            type Output = (BackendKind, &'static str);
            fn run<B: CompiledBackend>(self) -> Self::Output {
                (B::KIND, B::NAME)
            }
        }
        for kind in BackendKind::ALL {
            assert_eq!(dispatch(kind, Name), (kind, kind.as_str()));
        }
    }

    #[test]
    fn epoll_always_resolves() {
        assert_eq!(
            resolve(BackendChoice::Kind(BackendKind::Epoll)).map(|r| r.kind),
            Ok(BackendKind::Epoll)
        );
        assert_eq!(
            resolve(BackendChoice::Auto).map(|r| r.kind),
            Ok(AUTO_ORDER[0]),
            "auto takes the first backend of its order that can run, and epoll always can"
        );
    }
}
