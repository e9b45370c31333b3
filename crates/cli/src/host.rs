//! `shmesh status`: what the host daemon sees (`shmesh daemon` is
//! [`shmesh_daemon::cli`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use comfy_table::{Cell, CellAlignment, Table, presets};
use shmesh::Address;
use shmesh::control::{ConnectionStatus, MethodStats, StatusReport};
use shmesh_daemon::query_status;

/// `shmesh status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The daemon's socket (default: $SHMESH_DAEMON, else the daemon's
    /// default).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Refresh continuously until interrupted.
    #[arg(long, short)]
    watch: bool,
    /// Time between the samples that rates are computed from.
    #[arg(long, default_value = "1s", value_parser = humantime_duration)]
    interval: Duration,
    /// Print the daemon's report as JSON (one sample, no rates).
    #[arg(long, conflicts_with = "watch")]
    json: bool,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms or 2s"))?;
    let secs = match unit {
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("{s:?}: use ms, s or m")),
    };
    if !(0.05..=3600.0).contains(&secs) {
        return Err(format!("{s:?}: between 50ms and 60m"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `shmesh policy`.
#[derive(Debug, clap::Args)]
pub struct PolicyArgs {
    /// The daemon's socket (default: $SHMESH_DAEMON, else the daemon's
    /// default).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    action: PolicyAction,
}

/// What `shmesh policy` does.
#[derive(Debug, clap::Subcommand)]
enum PolicyAction {
    /// List the engines of the mediated path, in order.
    List,
    /// Add an engine described by a TOML file (`kind = "rate-limit"` …;
    /// see `shmesh_daemon::engine`).
    Add {
        /// The engine's spec.
        #[arg(long)]
        from: PathBuf,
        /// Where in the pipeline (0 = first; default last).
        #[arg(long)]
        position: Option<u32>,
    },
    /// Remove an engine; the calls it holds go on downstream.
    Remove {
        /// The engine's name.
        name: String,
    },
}

/// `shmesh upgrade`.
#[derive(Debug, clap::Args)]
pub struct UpgradeArgs {
    /// The engine to replace.
    engine: String,
    /// The new engine's spec (TOML); its state comes from the old one.
    #[arg(long)]
    from: PathBuf,
    /// The daemon's socket.
    #[arg(long)]
    socket: Option<PathBuf>,
}

fn daemon_socket(socket: Option<&PathBuf>) -> Result<Address> {
    Ok(match socket {
        Some(path) => {
            Address::from_path(path).with_context(|| format!("--socket {}", path.display()))?
        }
        None => shmesh::endpoint::daemon_socket()?,
    })
}

fn read_spec(path: &PathBuf) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Prints the pipeline, or the daemon's refusal.
fn show_answer(answer: &shmesh::control::PolicyAnswer) -> ExitCode {
    if answer.engines.is_empty() {
        println!("no engines: mediated calls go straight to a replica");
    } else {
        let mut table = Table::new();
        table
            .load_preset(presets::NOTHING)
            .set_header(["#", "ENGINE", "KIND", "SERVICE", "STATE"]);
        for (i, e) in answer.engines.iter().enumerate() {
            table.add_row([
                Cell::new(i),
                Cell::new(&e.name),
                Cell::new(&e.kind),
                Cell::new(&e.service),
                Cell::new(&e.description),
            ]);
        }
        println!("{table}");
    }
    match &answer.error {
        Some(error) => {
            eprintln!("refused: {error}");
            ExitCode::FAILURE
        }
        None => ExitCode::SUCCESS,
    }
}

/// `shmesh policy list|add|remove`.
pub fn policy(args: &PolicyArgs) -> Result<ExitCode> {
    use shmesh::control::PolicyRequest;
    let socket = daemon_socket(args.socket.as_ref())?;
    let request = match &args.action {
        PolicyAction::List => PolicyRequest::List,
        PolicyAction::Add { from, position } => PolicyRequest::Add {
            spec: read_spec(from)?,
            position: *position,
        },
        PolicyAction::Remove { name } => PolicyRequest::Remove { name: name.clone() },
    };
    Ok(show_answer(&shmesh_daemon::query_policy(&socket, request)?))
}

/// `shmesh upgrade ENGINE --from FILE`.
pub fn upgrade(args: &UpgradeArgs) -> Result<ExitCode> {
    let socket = daemon_socket(args.socket.as_ref())?;
    let request = shmesh::control::PolicyRequest::Upgrade {
        name: args.engine.clone(),
        spec: read_spec(&args.from)?,
    };
    Ok(show_answer(&shmesh_daemon::query_policy(&socket, request)?))
}

/// Shows the daemon's services, replicas, connections and per-method rates.
pub fn status(args: &StatusArgs) -> Result<ExitCode> {
    let socket = match &args.socket {
        Some(path) => {
            Address::from_path(path).with_context(|| format!("--socket {}", path.display()))?
        }
        None => shmesh::endpoint::daemon_socket()?,
    };
    if args.json {
        let report = query_status(&socket)?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut before = query_status(&socket)?;
    loop {
        std::thread::sleep(args.interval);
        let now = query_status(&socket)?;
        let text = render(&before, &now, args.interval);
        if args.watch {
            // Clear the screen and home the cursor, then redraw.
            print!("\x1b[2J\x1b[H{text}");
        } else {
            print!("{text}");
            return Ok(ExitCode::SUCCESS);
        }
        before = now;
    }
}

/// The status screen: the later report, with rates against the earlier.
fn render(before: &StatusReport, now: &StatusReport, interval: Duration) -> String {
    let mut out = format!(
        "shmeshd pid {}, up {}, metrics {}\n",
        now.pid,
        uptime(now.uptime_secs),
        now.metrics
            .as_deref()
            .map_or("off".to_owned(), |a| format!("http://{a}/metrics"))
    );
    if now.services.is_empty() {
        out.push_str("no services registered\n");
        return out;
    }
    let previous: HashMap<(u64, u32), u64> = before
        .services
        .iter()
        .flat_map(|s| &s.replicas)
        .flat_map(|r| {
            r.stats
                .iter()
                .flat_map(|st| &st.methods)
                .map(move |m| ((r.id, m.method), m.calls))
        })
        .collect();

    let mut services = Table::new();
    services.load_preset(presets::NOTHING).set_header([
        "SERVICE", "PATH", "SCHEMA", "REPLICAS", "CONNS", "GRANTED", "REFUSED",
    ]);
    let mut replicas = Table::new();
    replicas.load_preset(presets::NOTHING).set_header([
        "SERVICE", "REPLICA", "PID", "APP", "CONNS", "METHOD", "CALLS/S", "CALLS", "ERRORS", "P50",
        "P99",
    ]);
    let mut connections = Table::new();
    connections.load_preset(presets::NOTHING).set_header([
        "SERVICE",
        "REPLICA",
        "CONN",
        "CLIENT PID",
        "UID",
        "APP",
        "AGE",
    ]);
    let right = |s: String| Cell::new(s).set_alignment(CellAlignment::Right);
    for s in &now.services {
        let conns: usize = s
            .replicas
            .iter()
            .map(|r| r.connections.len())
            .sum::<usize>()
            + s.mediated_clients.len();
        services.add_row([
            Cell::new(&s.name),
            Cell::new(&s.path),
            Cell::new(hex_prefix(&s.schema)),
            right(s.replicas.len().to_string()),
            right(conns.to_string()),
            right(s.grants_total.to_string()),
            right(s.refusals_total.to_string()),
        ]);
        for r in &s.replicas {
            let (pid, app) = r.process.as_ref().map_or(("?".into(), String::new()), |p| {
                (p.pid.to_string(), p.app.clone())
            });
            let methods: Vec<&MethodStats> = r.stats.iter().flat_map(|st| &st.methods).collect();
            let first = [
                Cell::new(&s.name),
                right(r.id.to_string()),
                right(pid),
                Cell::new(app),
                right(r.connections.len().to_string()),
            ];
            if methods.is_empty() {
                let mut row = first.to_vec();
                let answered = if r.stats.is_some() { "-" } else { "no answer" };
                row.extend([Cell::new(answered)]);
                replicas.add_row(row);
            }
            for m in methods {
                let was = previous.get(&(r.id, m.method)).copied().unwrap_or(m.calls);
                let rate = m.calls.saturating_sub(was) as f64 / interval.as_secs_f64();
                let mut row = first.to_vec();
                row.extend([
                    right(m.method.to_string()),
                    right(format!("{rate:.1}")),
                    right(m.calls.to_string()),
                    right(errors(m).to_string()),
                    right(quantile(&m.latency, 0.5)),
                    right(quantile(&m.latency, 0.99)),
                ]);
                replicas.add_row(row);
            }
            for c in &r.connections {
                connections.add_row(connection_row(&s.name, r.id.to_string(), c));
            }
        }
        // Mediated clients are connected to the daemon, not to a replica.
        for c in &s.mediated_clients {
            connections.add_row(connection_row(&s.name, "shmeshd".into(), c));
        }
    }
    out.push_str(&format!("\n{services}\n\n{replicas}\n"));
    let mediated: Vec<_> = now
        .services
        .iter()
        .flat_map(|s| s.mediated.iter().map(move |m| (s, m)))
        .collect();
    if !mediated.is_empty() {
        let mut table = Table::new();
        table
            .load_preset(presets::NOTHING)
            .set_header(["MEDIATED", "METHOD", "CALLS", "ERRORS", "P50", "P99"]);
        for (s, m) in mediated {
            table.add_row([
                Cell::new(&s.name),
                right(m.method.to_string()),
                right(m.calls.to_string()),
                right(errors(m).to_string()),
                right(quantile(&m.latency, 0.5)),
                right(quantile(&m.latency, 0.99)),
            ]);
        }
        out.push_str(&format!("\n{table}\n"));
    }
    if !now.engines.is_empty() {
        let mut table = Table::new();
        table
            .load_preset(presets::NOTHING)
            .set_header(["ENGINE", "KIND", "SERVICE", "STATE"]);
        for e in &now.engines {
            table.add_row([&e.name, &e.kind, &e.service, &e.description]);
        }
        out.push_str(&format!("\n{table}\n"));
    }
    if !connections.is_empty() {
        out.push_str(&format!("\n{connections}\n"));
    }
    out
}

fn connection_row(service: &str, to: String, c: &ConnectionStatus) -> [Cell; 7] {
    let right = |s: String| Cell::new(s).set_alignment(CellAlignment::Right);
    [
        Cell::new(service),
        right(to),
        right(c.id.to_string()),
        right(c.caller.pid.to_string()),
        right(c.caller.uid.to_string()),
        Cell::new(&c.caller.app),
        right(uptime(c.age_secs)),
    ]
}

/// Calls that ended with another code than OK.
fn errors(m: &MethodStats) -> u64 {
    m.by_code
        .iter()
        .filter(|(code, _)| *code != 0)
        .map(|(_, n)| n)
        .sum()
}

/// The first bytes of a schema hash, enough to tell schemas apart.
fn hex_prefix(hash: &[u8; 32]) -> String {
    hash[..4].iter().map(|b| format!("{b:02x}")).collect()
}

fn uptime(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

/// The upper bound of the power-of-two bucket holding quantile `q`.
fn quantile(latency: &[u64], q: f64) -> String {
    let total: u64 = latency.iter().sum();
    if total == 0 {
        return "-".into();
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in latency.iter().enumerate() {
        seen += n;
        if seen >= rank {
            let ns = 1u64 << i.min(63);
            return match ns {
                0..1_000 => format!("<{ns}ns"),
                1_000..1_000_000 => format!("<{}us", ns / 1_000),
                _ => format!("<{}ms", ns / 1_000_000),
            };
        }
    }
    "-".into()
}

#[cfg(test)]
mod tests {
    use shmesh::control::{Caller, ReplicaStats, ReplicaStatus, ServiceStatus};

    use super::*;

    #[test]
    fn rates_come_from_the_difference_between_samples() {
        let sample = |calls| StatusReport {
            engines: Vec::new(),
            pid: 9,
            uptime_secs: 61,
            metrics: None,
            services: vec![ServiceStatus {
                name: "echo".into(),
                replicas: vec![ReplicaStatus {
                    id: 1,
                    process: Some(Caller {
                        pid: 42,
                        uid: 0,
                        gid: 0,
                        app: "echo-server".into(),
                    }),
                    connections: vec![],
                    stats: Some(ReplicaStats {
                        methods: vec![MethodStats {
                            method: 1,
                            calls,
                            by_code: vec![(0, calls)],
                            latency: vec![calls; 1],
                        }],
                        connections_total: 1,
                    }),
                }],
                ..ServiceStatus::default()
            }],
        };
        let text = render(&sample(100), &sample(350), Duration::from_millis(500));
        assert!(text.contains("up 1m01s"), "{text}");
        assert!(text.contains("500.0"), "{text}");
        assert!(text.contains("echo-server"), "{text}");
        assert!(text.contains("metrics off"), "{text}");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(humantime_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(humantime_duration("2"), Ok(Duration::from_secs(2)));
        assert!(humantime_duration("1h").is_err());
        assert!(humantime_duration("1ms").is_err());
    }
}
