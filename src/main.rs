//! The `certmq` binary: arguments (clap), logging (tracing), signals, exit codes. The work
//! is in the library; `anyhow` is used only here, to print error chains as one sentence.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use certmq::cli;
use certmq::config::{Config, ConfigError};
use certmq::registry::{Access, Backend, Mode, Registry};
use certmq::server::{self, Server, ServerError};

#[derive(Parser)]
#[command(
    name = "certmq",
    version,
    about = "MQTT-over-TLS broker with mutual X.509 device authentication"
)]
struct Cli {
    /// The config file; relative paths inside it resolve against its folder. Default:
    /// $CERTMQ_CONFIG, else config/certmq.toml if it exists, else /etc/certmq/certmq.toml.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker until SIGINT/SIGTERM.
    Serve,
    /// Validate the config as `serve` would and print a summary.
    Check,
    /// Ask the broker running on this config's data_dir to reload its config (as SIGHUP).
    Reload,
    /// Copy the registry and the message store (also while the broker runs) into a new
    /// directory, restorable by pointing data_dir at it.
    Backup {
        /// The directory to write certmq.db and messages.db into; it must not exist, or be
        /// empty.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Explain what the broker would decide for a client certificate chain, step by step,
    /// with the current config and registry. Changes nothing; exit 0 accept, 1 reject.
    Explain {
        /// PEM file: the client certificate, optionally followed by its intermediates.
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        /// Print one JSON object instead of the steps: decision ("accept" | "reject"),
        /// device, rule ("pinned:NAME" | "anchor:NAME"), reason, reason_code, fingerprint,
        /// common_name, steps, work.
        #[arg(long)]
        json: bool,
    },
    /// The device registry.
    Devices {
        #[command(subcommand)]
        command: DevicesCommand,
    },
    /// Write a complete example PKI and a config that uses it (certs-example/ is its
    /// output). Never replaces a file.
    DemoPki {
        /// The directory to write into (created if missing); none of the files may exist.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Validity of every certificate, in days.
        #[arg(long, default_value_t = 3650)]
        days: i64,
    },
}

#[derive(Subcommand)]
enum DevicesCommand {
    /// Every device: name, source (anchor or "pinned"), state, whether it is connected to
    /// the running broker ("-" when no broker of this data_dir answers), certificate
    /// expiry, last seen, dropped messages, fingerprint. Read-only.
    List {
        /// Print a JSON array of objects: name, source, fingerprint, enabled, online (bool,
        /// or null when unknown), not_after, created_at, last_seen_at (RFC 3339 or null),
        /// dropped_messages.
        #[arg(long)]
        json: bool,
    },
    /// One device, as in `list`; exit 1 if unknown. Read-only.
    Show {
        /// The device name, as `list` prints it.
        name: String,
        /// Print one JSON object with the fields of `list --json`.
        #[arg(long)]
        json: bool,
    },
    /// Refuse the device's connections (a running broker disconnects it within a second).
    Disable {
        /// The device name, as `list` prints it.
        name: String,
    },
    /// Accept the device again.
    Enable {
        /// The device name, as `list` prints it.
        name: String,
    },
    /// Remove the device and its sessions (its anchor may provision it again).
    Delete {
        /// The device name, as `list` prints it.
        name: String,
    },
    /// Write every device to a JSON file, e.g. to move a standalone registry into a
    /// cluster (docs/cluster.md). Changes nothing.
    Export {
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Enter the devices of an export into the registry this config selects (SQLite, or
    /// the cluster's bucket with `[cluster]`). Refuses, naming each, devices whose name the
    /// registry holds with another rule or certificate.
    Import {
        /// A file written by `certmq devices export`.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log = config_path(cli.config.clone())
        .map(|p| certmq::config::log_of(&p))
        .unwrap_or_default();
    init_tracing(&log);
    match run(cli) {
        Ok(code) => code,
        // `certmq devices list | head`: a closed stdout is not an error worth a message.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("certmq: {}", sentence(&e));
            ExitCode::from(1)
        }
    }
}

/// Logging as `[log]` says (contract §2, 10): `RUST_LOG`, when set, overrides the level; one line
/// per event, text (`key=value`) or JSON. An invalid level falls back to `info` here and is
/// reported by the config loader. `config::log_filter` adds the hold on rustls's
/// per-connection ClientHello remarks.
fn init_tracing(log: &certmq::config::Log) {
    use certmq::config::{log_filter, LogFormat};
    use tracing_subscriber::EnvFilter;
    let from_env = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
    let filter = from_env
        .and_then(|l| EnvFilter::try_new(log_filter(&l)).ok())
        .or_else(|| EnvFilter::try_new(log_filter(&log.level)).ok())
        .unwrap_or_else(|| EnvFilter::new(log_filter("info")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// An error chain as one sentence: "a: b: c".
fn sentence(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = || config_path(cli.config.clone());
    match cli.command {
        Command::Serve => serve(&config()?),
        Command::Check => check(&config()?),
        Command::Reload => reload(&config()?),
        Command::Backup { out } => {
            let data_dir = match certmq::config::data_dir_of(&config()?) {
                Some(d) => d,
                None => match load(&config()?) {
                    Ok(c) => c.server.data_dir,
                    Err(code) => return Ok(code),
                },
            };
            for f in certmq::backup::backup(&data_dir, &out)? {
                writeln!(std::io::stdout(), "wrote {}", f.display())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain { cert, json } => explain(&config()?, &cert, json),
        Command::Devices { command } => devices(&config()?, command),
        Command::DemoPki { out, days } => {
            let files = certmq::pki::write_demo(&out, days)?;
            writeln!(
                std::io::stdout(),
                "wrote {} files to {}",
                files.files.len(),
                out.display()
            )?;
            writeln!(
                std::io::stdout(),
                "run: certmq serve --config {}",
                files.config.display()
            )?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Where the config file is (contract §1): `--config`, else `$CERTMQ_CONFIG`, else
/// `config/certmq.toml` when it exists, else `/etc/certmq/certmq.toml`. When none is there
/// the error names every place tried.
fn config_path(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    if let Some(p) = std::env::var_os("CERTMQ_CONFIG").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let local = PathBuf::from(certmq::config::DEFAULT_PATH);
    if local.exists() {
        return Ok(local);
    }
    let system = PathBuf::from(certmq::config::SYSTEM_PATH);
    if system.exists() {
        return Ok(system);
    }
    anyhow::bail!(
        "no config file found: tried $CERTMQ_CONFIG (not set), {} (relative to {}) and {}; give one with --config PATH",
        local.display(),
        std::env::current_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|_| "the working directory".to_owned()),
        system.display()
    )
}

/// Loads the config, printing every problem on failure.
fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| report(&e))
}

fn report(e: &ConfigError) -> ExitCode {
    eprintln!("certmq: {e}:");
    for p in &e.problems {
        eprintln!("  {p}");
    }
    ExitCode::from(1)
}

fn check(path: &Path) -> anyhow::Result<ExitCode> {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    // The registry, when it exists (with [cluster], the cluster's bucket), must not hold
    // a pinned name for an anchor; one that cannot be read is a problem listed with those
    // of data_dir.
    let mut problems = Vec::new();
    match registry_to_read(&config) {
        Ok(registry) => {
            if let Err(ServerError::Config(e)) =
                server::sync_pinned(&config, registry.as_ref(), Mode::DryRun)
            {
                return Ok(report(&e));
            }
        }
        Err(e) => problems.push(format!("registry: {}", sentence(&e))),
    }
    // What `serve` would meet next: its listeners and its data_dir.
    problems.extend(cli::serve_preflight(&config));
    if !problems.is_empty() {
        eprintln!(
            "certmq: {} problem(s) with {}:",
            problems.len(),
            config.path.display()
        );
        for p in &problems {
            eprintln!("  {p}");
        }
        return Ok(ExitCode::from(1));
    }
    cli::check_summary(&config, &mut std::io::stdout().lock())?;
    Ok(ExitCode::SUCCESS)
}

/// `certmq reload`: the broker of this config's data_dir, found through its control
/// socket (never by process name), reloads; its answer is printed.
fn reload(path: &Path) -> anyhow::Result<ExitCode> {
    // Only data_dir is read here: validating the file is the broker's answer (it may read
    // keys this user cannot). A file without a readable data_dir gets the full report.
    let data_dir = match certmq::config::data_dir_of(path) {
        Some(d) => d,
        None => match load(path) {
            Ok(c) => c.server.data_dir,
            Err(code) => return Ok(code),
        },
    };
    let reply = server::control::request_reload(&data_dir)?;
    let ok = reply.starts_with("reloaded");
    if ok {
        write!(std::io::stdout(), "{reply}")?;
        Ok(ExitCode::SUCCESS)
    } else {
        write!(std::io::stderr(), "{reply}")?;
        Ok(ExitCode::from(1))
    }
}

fn explain(path: &Path, cert: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let chain = cli::read_chain(cert)?;
    let registry = registry_to_read(&config)?;
    let decision = cli::explain(&config, registry.as_ref(), &chain);
    if json {
        writeln!(
            std::io::stdout(),
            "{}",
            cli::explain_json(&config, &decision)
        )?;
    } else {
        for step in cli::explain_steps(&config, &decision) {
            writeln!(std::io::stdout(), "{step}")?;
        }
        match &decision.result {
            Ok(a) => writeln!(
                std::io::stdout(),
                "decision: accept as device {:?} by {}",
                a.device.as_str(),
                a.rule_label
            ),
            Err(e) => writeln!(std::io::stdout(), "decision: reject ({}): {e}", e.label()),
        }?;
    }
    Ok(if decision.result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `certmq devices ...`: never creates the registry (docs/operations.md, "Files and
/// permissions"); `list` and `show` open it read-only and ask a running broker which
/// devices are online. With `[cluster]` the commands act on the cluster's bucket.
fn devices(path: &Path, command: DevicesCommand) -> anyhow::Result<ExitCode> {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    if let Some(settings) = &config.cluster {
        // A device may be connected to any node: this node's broker cannot say.
        let registry = cluster_registry(&config, settings)?;
        return manage(&registry, command, &cli::Online::unknown());
    }
    let data_dir = &config.server.data_dir;
    let access = match command {
        DevicesCommand::List { .. }
        | DevicesCommand::Show { .. }
        | DevicesCommand::Export { .. } => Access::ReadOnly,
        _ => Access::ReadWrite,
    };
    let registry = match (Registry::open_existing(data_dir, access)?, &command) {
        (Some(r), _) => r,
        // Importing into a data_dir without a registry yet creates it.
        (None, DevicesCommand::Import { .. }) => Registry::open(data_dir)?,
        (None, DevicesCommand::List { .. } | DevicesCommand::Export { .. }) => {
            Registry::in_memory()?
        }
        (
            None,
            DevicesCommand::Show { name, .. }
            | DevicesCommand::Disable { name }
            | DevicesCommand::Enable { name }
            | DevicesCommand::Delete { name },
        ) => {
            return Err(cli::CliError::NoRegistry {
                name: name.clone(),
                path: data_dir.join(certmq::registry::DB_FILE),
            }
            .into())
        }
    };
    manage(&registry, command, &cli::Online::ask(data_dir))
}

/// The cluster's registry bucket, read through NATS (exit 1 naming the servers when they
/// cannot be reached).
fn cluster_registry(
    config: &Config,
    settings: &certmq::config::Cluster,
) -> anyhow::Result<certmq::cluster::registry::KvRegistry> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    certmq::cluster::registry::KvRegistry::open_blocking(runtime, settings).with_context(|| {
        format!(
            "cannot read the cluster registry of {} (the config has [cluster])",
            config.path.display()
        )
    })
}

/// The registry `check` and `explain` consult: the cluster's bucket with `[cluster]`,
/// else SQLite in `data_dir` when it exists (else an empty one; nothing is created).
fn registry_to_read(config: &Config) -> anyhow::Result<Box<dyn Backend>> {
    Ok(match &config.cluster {
        Some(settings) => Box::new(cluster_registry(config, settings)?),
        None => Box::new(cli::registry_for_reading(config)?),
    })
}

/// `certmq devices ...` against either registry.
fn manage(
    registry: &dyn Backend,
    command: DevicesCommand,
    online: &cli::Online,
) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match command {
        DevicesCommand::List { json } => {
            let all = registry.list()?;
            if json {
                let rows: Vec<_> = all.iter().map(|d| cli::device_json(d, online)).collect();
                writeln!(out, "{}", serde_json::Value::Array(rows))?;
            } else {
                writeln!(out, "{}", cli::device_header())?;
                for d in &all {
                    writeln!(out, "{}", cli::device_line(d, online))?;
                }
            }
        }
        DevicesCommand::Show { name, json } => {
            let Some(d) = registry.get(&name)? else {
                return Err(cli::CliError::UnknownDevice(name).into());
            };
            if json {
                writeln!(out, "{}", cli::device_json(&d, online))?;
            } else {
                writeln!(out, "{}", cli::device_header())?;
                writeln!(out, "{}", cli::device_line(&d, online))?;
            }
        }
        DevicesCommand::Disable { name } => {
            registry.set_enabled(&name, false)?;
            writeln!(out, "device {name} disabled")?;
        }
        DevicesCommand::Enable { name } => {
            registry.set_enabled(&name, true)?;
            writeln!(out, "device {name} enabled")?;
        }
        DevicesCommand::Delete { name } => {
            registry.delete(&name)?;
            writeln!(out, "device {name} deleted")?;
        }
        DevicesCommand::Export { out: file } => {
            drop(out);
            return export(registry, &file);
        }
        DevicesCommand::Import { file } => {
            let imported = cli::import(registry, &file)?;
            let ok = cli::import_report(
                &file,
                registry,
                &imported,
                &mut out,
                &mut std::io::stderr().lock(),
            )?;
            if !ok {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `certmq devices export --out FILE`.
fn export(registry: &dyn Backend, out: &Path) -> anyhow::Result<ExitCode> {
    let n = cli::export(registry, out)?;
    writeln!(
        std::io::stdout(),
        "exported {n} devices from {} to {}",
        registry.describe(),
        out.display()
    )?;
    Ok(ExitCode::SUCCESS)
}

fn serve(path: &Path) -> anyhow::Result<ExitCode> {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    // Before SQLite meets them: a file this user may not write is named with its owner and
    // mode, not as SQLite's "attempt to write a readonly database".
    let problems = cli::data_dir_problems(&config.server.data_dir);
    if !problems.is_empty() {
        eprintln!(
            "certmq: {} problem(s) with {}:",
            problems.len(),
            config.path.display()
        );
        for p in &problems {
            eprintln!("  {p}");
        }
        return Ok(ExitCode::from(1));
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let server = match Server::new(config) {
            Ok(s) => s,
            Err(ServerError::Config(e)) => return Ok(report(&e)),
            Err(e) => return Err(e.into()),
        };
        // Installed before the listeners are announced: until then SIGHUP and SIGTERM
        // keep their default action, and a reload sent right after start killed the broker.
        let handlers = UnixSignals::install().context("cannot install signal handlers")?;
        server.join_cluster().await?;
        let listener = server.bind().await?;
        let shutdown = CancellationToken::new();
        tokio::spawn(signals(handlers, shutdown.clone(), server.shared()));
        server.run(listener, shutdown).await?;
        tracing::info!("stopped");
        Ok(ExitCode::SUCCESS)
    })
}

/// The signals `serve` handles. Creating a tokio signal stream installs the process's
/// handler at once, so holding these means no signal can take its default action any more.
struct UnixSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl UnixSignals {
    /// Installs the handlers; must run inside the runtime.
    fn install() -> std::io::Result<UnixSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(UnixSignals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// SIGINT/SIGTERM: graceful shutdown; a second one exits at once. SIGHUP: reload (contract §8);
/// an invalid file is logged problem by problem and the old config stays in force.
async fn signals(
    handlers: UnixSignals,
    shutdown: CancellationToken,
    shared: std::sync::Arc<server::Shared>,
) {
    let UnixSignals {
        mut int,
        mut term,
        mut hup,
    } = handlers;
    loop {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
            _ = hup.recv() => {
                let s = shared.clone();
                match tokio::task::spawn_blocking(move || s.reload()).await {
                    Ok(outcome) => {
                        server::control::reload_reply(&outcome, "SIGHUP");
                    }
                    Err(e) => tracing::error!(error = %e, "SIGHUP: reload task failed"),
                }
                continue;
            }
        }
        if shutdown.is_cancelled() {
            tracing::warn!("second signal: exiting now");
            std::process::exit(1);
        }
        tracing::info!("signal received: shutting down");
        shutdown.cancel();
    }
}
