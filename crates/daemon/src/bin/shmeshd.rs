//! `shmeshd`: the shmesh host daemon on its own (the same as
//! `shmesh daemon`), for service managers and tests.

use std::process::ExitCode;

use clap::Parser;

/// The shmesh host daemon: service registry, brokered shared-memory
/// connections (`shm+svc://NAME`), access control, Prometheus metrics.
#[derive(Debug, Parser)]
#[command(name = "shmeshd", version)]
struct Args {
    #[command(flatten)]
    daemon: shmesh_daemon::cli::DaemonArgs,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match shmesh_daemon::cli::run(&Args::parse().daemon) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shmeshd: {e}");
            ExitCode::FAILURE
        }
    }
}
