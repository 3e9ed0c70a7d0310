//! The command line: `serve`, `check`, `config`, `plugins`, `bench`, `client`.
//!
//! Every failure a user can cause (bad config, busy port, refused io_uring) ends here as one
//! line per problem on stderr and a non-zero exit ([`wharf_core::exit_status`]): 2 for
//! configuration errors, 3 when `serve` finds a listen address taken, 1 for other runtime
//! failures. No panics, no backtraces.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand};
use wharf_bench::tls::{ClientTls, TlsArgs};
use wharf_core::config::{
    BackendChoice, BackendKind, ClientAuth, ConfigError, TlsVersion, SECRET_PLACEHOLDER,
};
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
    /// Validate the config like `check`, then print it in full as wharf would run it: the file
    /// (or the embedded default), WHARF_* overrides and every default, plugin options included,
    /// secrets replaced. The output is a config file `serve --config` accepts once any secret
    /// is filled back in.
    Config {
        /// Config file (TOML); without it, the embedded configs/default.toml.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// List the compiled-in plugins and their options.
    Plugins,
    /// Load-test a service, or compare the backends on one (`wharf bench swap`).
    Bench {
        #[command(subcommand)]
        command: wharf_bench::BenchCommand,
    },
    /// Talk to a running service.
    Client {
        #[command(subcommand)]
        command: ClientCommand,
    },
}

#[derive(Subcommand)]
enum ClientCommand {
    /// Send text to an echo service and print what comes back: the words given, or stdin.
    Echo {
        /// Service address, e.g. 127.0.0.1:6969, or unix:/path/to.sock (unix:@name: abstract).
        addr: String,
        #[command(flatten)]
        tls: TlsArgs,
        /// Words to send, joined by spaces, with a newline (default: stdin, as it is).
        text: Vec<String>,
    },
    /// Run a command on an exec service: the one given after `--`, or each line of stdin.
    /// Exit status: the command's, 124 on timeout, 126 when refused, 1 on errors.
    Exec {
        /// Service address, e.g. 127.0.0.1:8000, or unix:/path/to.sock (unix:@name: abstract).
        addr: String,
        #[command(flatten)]
        tls: TlsArgs,
        /// Authenticate with this token first.
        #[arg(long)]
        token: Option<String>,
        /// The command line (after `--`).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Download a file from a file-get service, verified by MD5 before it gets its name.
    Get {
        /// Service address, e.g. 127.0.0.1:9999, or unix:/path/to.sock (unix:@name: abstract).
        addr: String,
        #[command(flatten)]
        tls: TlsArgs,
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
        /// Service address, e.g. 127.0.0.1:9999, or unix:/path/to.sock (unix:@name: abstract).
        addr: String,
        #[command(flatten)]
        tls: TlsArgs,
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
        Command::Check { config } => with_plan(config.as_deref(), &registry, print_plan),
        Command::Config { config } => with_plan(config.as_deref(), &registry, |plan| {
            print!("{}", effective_config(plan))
        }),
        Command::Plugins => {
            print_plugins(&registry);
            0
        }
        Command::Bench { command } => wharf_bench::run(command),
        Command::Client { command } => run_client(command),
    }
}

/// Runs `wharf client ...`; returns its exit status (1 for a bad TLS flag, like any error).
fn run_client(command: ClientCommand) -> i32 {
    let (addr, tls) = match &command {
        ClientCommand::Echo { addr, tls, .. }
        | ClientCommand::Exec { addr, tls, .. }
        | ClientCommand::Get { addr, tls, .. }
        | ClientCommand::List { addr, tls, .. } => (addr, tls),
    };
    let tls: Option<ClientTls> = match tls.client(addr) {
        Ok(tls) => tls,
        Err(e) => return client::fail(&e),
    };
    let tls = tls.as_ref();
    match command {
        ClientCommand::Echo { addr, text, .. } => client::echo(&addr, tls, &text),
        ClientCommand::Exec {
            addr,
            token,
            command,
            ..
        } => client::exec(&addr, tls, token.as_deref(), &command),
        ClientCommand::Get {
            addr,
            path,
            output,
            resume,
            ..
        } => client::get(&addr, tls, &path, output.as_deref(), resume),
        ClientCommand::List { addr, dir, .. } => client::list(&addr, tls, dir.as_deref()),
    }
}

/// Loads and validates the config as `serve` would (file or embedded default, `WHARF_*`
/// environment, no flags) and shows the plan with `show`; every error otherwise (exit 2).
fn with_plan(
    config: Option<&std::path::Path>,
    registry: &Registry,
    show: impl FnOnce(&plan::Plan),
) -> i32 {
    match plan::load(config, std::env::vars_os(), &Overrides::default(), registry) {
        Ok(plan) => {
            show(&plan);
            exit_status::OK
        }
        Err(errors) => report_config_errors(&errors),
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
    exit_status::CONFIG_ERROR
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
        if let (Some(tls), Some(loaded)) = (&c.tls, &svc.tls) {
            println!("    {}", describe_tls(tls, loaded));
        }
        if let Some(unix) = wharf_core::unix::describe(c) {
            println!("    {unix}");
        }
        let options = toml::to_string(&svc.built.shown_options).unwrap_or_default();
        for line in options.lines() {
            println!("    {line}");
        }
    }
    println!("ok: {} service(s) valid", plan.services.len());
}

/// One line on a service's TLS for `wharf check`: the files, until when the certificate is
/// valid, and the policy.
fn describe_tls(
    tls: &wharf_core::config::TlsConfig,
    loaded: &wharf_core::tls::files::LoadedTls,
) -> String {
    let clients = match (&tls.client_ca, loaded.client_auth) {
        (Some(ca), Some(ClientAuth::Optional)) => format!("optional, from {}", ca.display()),
        (Some(ca), _) => format!("required, from {}", ca.display()),
        (None, _) => "none".to_string(),
    };
    let alpn: Vec<String> = loaded
        .server_config
        .alpn_protocols
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    let left = loaded
        .not_after
        .duration_since(std::time::SystemTime::now())
        .map_or(0, |d| d.as_secs() / 86_400);
    format!(
        "tls: cert = {}, key = {}, valid until {} ({left} days left), client certificates: \
         {clients}, min_version = {}, alpn = [{}], handshake_timeout = {}",
        tls.cert.display(),
        tls.key.display(),
        humantime::format_rfc3339_seconds(loaded.not_after),
        match tls.min_version {
            TlsVersion::Tls12 => "1.2",
            TlsVersion::Tls13 => "1.3",
        },
        alpn.join(", "),
        humantime::format_duration(tls.handshake_timeout)
    )
}

/// The configuration `plan` runs, as TOML `serve --config` accepts: every key with its
/// effective value, secrets replaced by [`SECRET_PLACEHOLDER`], and a header saying where the
/// values came from.
fn effective_config(plan: &plan::Plan) -> String {
    let mut header = vec![
        "# The effective configuration, as printed by `wharf config`.".to_string(),
        format!("# Base: {}", plan.origin),
    ];
    let overrides: Vec<&str> = plan.source.env_overrides().collect();
    header.push(if overrides.is_empty() {
        "# Environment: no WHARF_* overrides".to_string()
    } else {
        format!("# Environment: overridden by {}", overrides.join(", "))
    });
    header.push("# Every key the base does not set shows its built-in default.".into());
    header.push(format!(
        "# Secrets show as \"{SECRET_PLACEHOLDER}\", which wharf refuses: fill them in before use."
    ));
    let mut doc = toml::Table::new();
    let mut put = |key: &str, value: Result<toml::Table, toml::ser::Error>| match value {
        Ok(table) => {
            doc.insert(key.to_string(), toml::Value::Table(table));
        }
        Err(e) => header.push(format!("# {key} cannot be shown: {e}")),
    };
    put("server", toml::Table::try_from(&plan.config.server));
    if let Some(metrics) = &plan.config.metrics {
        put("metrics", toml::Table::try_from(metrics));
    }
    let mut services = toml::Table::new();
    for svc in &plan.services {
        match toml::Table::try_from(&svc.config) {
            Ok(mut table) => {
                let options = svc.built.shown_options.clone();
                table.insert("options".into(), toml::Value::Table(options));
                services.insert(svc.name.clone(), toml::Value::Table(table));
            }
            Err(e) => header.push(format!("# services.{} cannot be shown: {e}", svc.name)),
        }
    }
    for name in plan.config.services.keys() {
        if !services.contains_key(name) {
            header.push(format!(
                "# services.{name} is left out (see the warning above)"
            ));
        }
    }
    doc.insert("services".into(), toml::Value::Table(services));
    let body = toml::to_string(&doc).unwrap_or_else(|e| format!("# cannot be shown: {e}\n"));
    format!("{}\n\n{body}", header.join("\n"))
}

fn print_plugins(registry: &Registry) {
    for p in registry.iter() {
        println!("{}: {}", p.name, p.description);
        if p.datagrams {
            println!("    answers datagrams too: listen = \"udp:IP:port\" serves UDP");
        }
        // Every stream plugin serves both stream kinds of `listen`.
        println!("    listens on: TCP (IP:port), unix:/path, unix:@name");
        let defaults = (p.defaults)();
        for opt in p.options {
            let default = defaults
                .get(opt.name)
                .map(|d| format!(" (default {d})"))
                .unwrap_or_default();
            println!(
                "    {} = {}{default}\n        {}",
                opt.name, opt.kind, opt.help
            );
        }
    }
}

/// The log filter when `WHARF_LOG`/`RUST_LOG` do not name these targets: rustls logs what
/// clients do wrong (an IP address sent as SNI, a bad record) at warn level, once per
/// connection, so any client could fill the log. wharf counts those outcomes in its metrics
/// and logs them itself where they matter.
const QUIET_TARGETS: &[&str] = &["rustls=error"];

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let spec = std::env::var("WHARF_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let mut filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"));
    for quiet in QUIET_TARGETS {
        let target = quiet.split('=').next().unwrap_or(quiet);
        if !spec.contains(target) {
            if let Ok(directive) = quiet.parse() {
                filter = filter.add_directive(directive);
            }
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
