//! The daemon's command line, shared by `shmesh daemon` and the `shmeshd`
//! binary: flags over the config file, logs to stderr, stop on SIGINT or
//! SIGTERM.

use std::path::PathBuf;

use thiserror::Error;

use crate::config::{Config, ConfigError};
use crate::{Daemon, DaemonError};

/// Flags of `shmesh daemon` / `shmeshd`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DaemonArgs {
    /// A TOML config file (default: none; every setting has a default).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The socket to listen on (overrides the config; default
    /// $XDG_RUNTIME_DIR/shmesh/shmeshd.sock, else /run/shmesh/shmeshd.sock).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Where to serve Prometheus /metrics (overrides the config; default
    /// 127.0.0.1:9464; port 0 picks a free one), or `off`.
    #[arg(long)]
    pub metrics: Option<String>,
}

/// The daemon could not run.
#[derive(Debug, Error)]
pub enum CliError {
    /// The config file is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `--metrics` is neither an address nor `off`.
    #[error("--metrics {0:?}: expected HOST:PORT or off")]
    MetricsFlag(String),
    /// The daemon could not start.
    #[error("cannot start shmeshd: {0}")]
    Start(#[from] DaemonError),
    /// Signals cannot be watched.
    #[error("cannot watch for signals: {0}")]
    Signals(std::io::Error),
}

impl DaemonArgs {
    /// The configuration these flags give: the file's, overridden by flags.
    pub fn config(&self) -> Result<Config, CliError> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(socket) = &self.socket {
            config.socket = Some(socket.clone());
        }
        match self.metrics.as_deref() {
            None => {}
            Some("off") => config.metrics.enabled = false,
            Some(address) => {
                config.metrics.enabled = true;
                config.metrics.listen = address
                    .parse()
                    .map_err(|_| CliError::MetricsFlag(address.to_owned()))?;
            }
        }
        Ok(config)
    }
}

/// Runs the daemon until SIGINT or SIGTERM. Prints where it listens on
/// stderr (`shmeshd listening on PATH`, `metrics at http://ADDR/metrics`).
pub fn run(args: &DaemonArgs) -> Result<(), CliError> {
    let daemon = Daemon::bind(args.config()?)?;
    eprintln!("shmeshd listening on {}", daemon.socket().display());
    match daemon.metrics_address() {
        Some(address) => eprintln!("metrics at http://{address}/metrics"),
        None => eprintln!("metrics off"),
    }
    let handle = daemon.shutdown_handle();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Signals)?;
    let (mut term, mut int) = runtime
        .block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            Ok::<_, std::io::Error>((
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
            ))
        })
        .map_err(CliError::Signals)?;
    std::thread::Builder::new()
        .name("shmeshd-signals".into())
        .spawn(move || {
            runtime.block_on(async {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            });
            eprintln!("shmeshd stopping");
            handle.shutdown();
        })
        .map_err(CliError::Signals)?;
    daemon.run();
    Ok(())
}
