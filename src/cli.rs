//! The command line: `serve`, `check`, `plugins`, `bench`, `client`.
//!
//! Every failure a user can cause (bad config, busy port, refused io_uring) ends here as one
//! line per problem on stderr and a non-zero exit ([`wharf_core::exit_status`]): 2 for
//! configuration errors, 3 when `serve` finds a listen address taken, 1 for other runtime
//! failures. No panics, no backtraces.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand};
use wharf_core::config::{BackendChoice, BackendKind, ConfigError};
use wharf_core::exit_status;

use crate::client;
use crate::plan::{self, Overrides};
use crate::registry::Registry;
use crate::server;

/// wharf: a plugin-based TCP protocol server with epoll and io_uring backends.
#[derive(Parser)]
#[command(name = "wharf", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the configured services until SIGTERM or SIGINT; SIGHUP reloads the config.
    Serve {
        /// Config file (TOML); without it, the embedded configs/default.toml.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Override server.backend.
        #[arg(long, value_parser = backend_arg())]
        backend: Option<BackendChoice>,
        /// Override server.workers (0 = one per CPU).
        #[arg(long)]
        workers: Option<usize>,
        /// Reload when the config file's content changes (as on SIGHUP), checked twice a second.
        #[arg(long, requires = "config")]
        watch_config: bool,
    },
    /// Validate the config without binding anything, and print the resolved services.
    Check {
        /// Config file (TOML); without it, the embedded configs/default.toml.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// List the compiled-in plugins and their options.
    Plugins,
    /// Load-test a service, or compare the backends on one (`wharf bench swap`).
    Bench {
        #[command(subcommand)]
        command: crate::bench::BenchCommand,
    },
    /// Talk to a running service.
    Client {
        #[command(subcommand)]
        command: ClientCommand,
    },
}

#[derive(Subcommand)]
enum ClientCommand {
    /// Run a command on an exec service: the one given after `--`, or each line of stdin.
    /// Exit status: the command's, 124 on timeout, 126 when refused, 1 on errors.
    Exec {
        /// Service address, e.g. 127.0.0.1:8000.
        addr: String,
        /// Authenticate with this token first.
        #[arg(long)]
        token: Option<String>,
        /// The command line (after `--`).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Download a file from a file-get service, verified by MD5 before it gets its name.
    Get {
        /// Service address, e.g. 127.0.0.1:9999.
        addr: String,
        /// Path under the service's root.
        path: String,
        /// Where to save it (default: the file's name, in the current directory).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Continue a previous, interrupted download (`<output>.part`).
        #[arg(long)]
        resume: bool,
    },
    /// List a directory of a file-get service.
    List {
        /// Service address, e.g. 127.0.0.1:9999.
        addr: String,
        /// Directory under the service's root (default: the root).
        dir: Option<String>,
    },
}

/// `--backend`: `auto` or a backend's name (or alias), as [`BackendChoice`] parses them, all
/// listed in `--help`.
fn backend_arg() -> impl TypedValueParser<Value = BackendChoice> {
    let auto = PossibleValue::new(BackendChoice::Auto.as_str());
    let kinds = BackendKind::ALL.into_iter().map(backend_value);
    PossibleValuesParser::new(std::iter::once(auto).chain(kinds))
        .try_map(|name| name.parse::<BackendChoice>())
}

/// A backend's name (or alias) as a command-line value, e.g. `bench swap --backends`.
pub fn backend_kind_arg() -> impl TypedValueParser<Value = BackendKind> {
    PossibleValuesParser::new(BackendKind::ALL.into_iter().map(backend_value))
        .try_map(|name| name.parse::<BackendKind>())
}

fn backend_value(kind: BackendKind) -> PossibleValue {
    PossibleValue::new(kind.as_str()).aliases(kind.aliases().iter().copied())
}

/// Parses arguments and runs the command; returns the process exit code.
pub fn main(registry: Registry) -> i32 {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Serve {
            config,
            backend,
            workers,
            watch_config,
        } => {
            let overrides = Overrides { backend, workers };
            server::catch_early_sighup();
            // What --watch-config compares against: the file as it was before this load.
            let watch = config
                .clone()
                .filter(|_| watch_config)
                .map(|path| (path.clone(), std::fs::read(path).ok()));
            let plan = match plan::load(
                config.as_deref(),
                std::env::vars_os(),
                &overrides,
                &registry,
            ) {
                Ok(plan) => plan,
                Err(errors) => return report_config_errors(&errors),
            };
            let reload = server::ReloadSource {
                watch,
                load: std::sync::Arc::new(move || {
                    plan::load(
                        config.as_deref(),
                        std::env::vars_os(),
                        &overrides,
                        &registry,
                    )
                }),
            };
            match server::run(plan, reload) {
                Ok(()) => exit_status::OK,
                Err(e) => {
                    eprintln!("wharf: error: {e}");
                    e.exit_status()
                }
            }
        }
        Command::Check { config } => {
            match plan::load(
                config.as_deref(),
                std::env::vars_os(),
                &Overrides::default(),
                &registry,
            ) {
                Ok(plan) => {
                    print_plan(&plan);
                    0
                }
                Err(errors) => report_config_errors(&errors),
            }
        }
        Command::Plugins => {
            print_plugins(&registry);
            0
        }
        Command::Bench { command } => crate::bench::main(command),
        Command::Client { command } => match command {
            ClientCommand::Exec {
                addr,
                token,
                command,
            } => client::exec(&addr, token.as_deref(), &command),
            ClientCommand::Get {
                addr,
                path,
                output,
                resume,
            } => client::get(&addr, &path, output.as_deref(), resume),
            ClientCommand::List { addr, dir } => client::list(&addr, dir.as_deref()),
        },
    }
}

fn report_config_errors(errors: &[ConfigError]) -> i32 {
    for e in errors {
        eprintln!("wharf: config error: {e}");
    }
    eprintln!(
        "wharf: {} configuration error{}; nothing was started",
        errors.len(),
        if errors.len() == 1 { "" } else { "s" }
    );
    2
}

fn print_plan(plan: &plan::Plan) {
    let server = &plan.config.server;
    let overrides: Vec<&str> = plan.source.env_overrides().collect();
    if overrides.is_empty() {
        println!("config: {}", plan.origin);
    } else {
        println!(
            "config: {} (overridden by {})",
            plan.origin,
            overrides.join(", ")
        );
    }
    let workers = match server.workers {
        0 => format!(
            "0 (one per CPU: {})",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ),
        n => n.to_string(),
    };
    println!(
        "server: backend = {}, workers = {workers}, shutdown_grace = {}",
        server.backend.as_str(),
        humantime::format_duration(server.shutdown_grace)
    );
    match &plan.config.metrics {
        Some(m) => println!("metrics: http://{}/metrics", m.listen),
        None => println!("metrics: off"),
    }
    for svc in &plan.services {
        let c = &svc.config;
        let allow = if c.allow_from.is_empty() {
            "any".to_string()
        } else {
            c.allow_from
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let idle = if c.idle_timeout.is_zero() {
            "off".to_string()
        } else {
            humantime::format_duration(c.idle_timeout).to_string()
        };
        println!(
            "service {}: plugin = {}, listen = {}, max_connections = {}, idle_timeout = {idle}, allow_from = {allow}, max_blocking = {}",
            svc.name, c.plugin, c.listen, c.max_connections, c.max_blocking
        );
        for line in svc.built.shown_options.lines() {
            println!("    {line}");
        }
    }
    println!("ok: {} service(s) valid", plan.services.len());
}

fn print_plugins(registry: &Registry) {
    for p in registry.iter() {
        println!("{}: {}", p.name, p.description);
        let defaults = (p.defaults)();
        for opt in p.options {
            let default = defaults
                .lines()
                .find_map(|l| {
                    l.strip_prefix(opt.name)
                        .and_then(|r| r.trim_start().strip_prefix('='))
                })
                .map(|d| format!(" (default {})", d.trim()))
                .unwrap_or_default();
            println!(
                "    {} = {}{default}\n        {}",
                opt.name, opt.kind, opt.help
            );
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("WHARF_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
