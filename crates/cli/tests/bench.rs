//! `shmesh bench --json` through the built binary: every line is a JSON
//! object with the documented keys, and every requested peer produced a row.
//! No timing is asserted: the machine may be busy.

use std::collections::BTreeSet;
use std::process::Command;

const PEERS: [&str; 13] = [
    "shmesh-poll",
    "shmesh-adaptive",
    "shmesh-block",
    "shmesh-async-adaptive",
    "shmesh-direct-daemon",
    "shmesh-mediated",
    "shmesh-mediated-traced",
    "shmesh-rkyv",
    "shmesh-prost",
    "tonic-tcp",
    "tonic-uds",
    "raw-floor",
    "raw-futex",
];

const NUMBERS: [&str; 6] = [
    "p50_us",
    "p99_us",
    "p999_us",
    "calls_per_s",
    "cpu_us_per_call",
    "size",
];

/// Each run keeps both cores busy with polling peers; two at once on a
/// 2-core machine can starve a row of every call, so they run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn bench(args: &[&str]) -> Result<Vec<serde_json::Value>, Box<dyn std::error::Error>> {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let output = Command::new(env!("CARGO_BIN_EXE_shmesh"))
        .arg("bench")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()?;
    let stdout = String::from_utf8(output.stdout)?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "shmesh bench failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    let mut rows = Vec::new();
    for line in stdout.lines() {
        let row: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| format!("not JSON: {line:?}: {e}\nstderr:\n{stderr}"))?;
        rows.push(row);
    }
    Ok(rows)
}

#[test]
fn json_rows_cover_every_peer() -> Result<(), Box<dyn std::error::Error>> {
    let rows = bench(&[
        "--quick",
        "--json",
        "--sizes",
        "64",
        "--inflight",
        "1,4",
        "--duration",
        "20ms",
    ])?;
    let mut seen = BTreeSet::new();
    for row in &rows {
        let object = row.as_object().ok_or("a row is not an object")?;
        let peer = object
            .get("peer")
            .and_then(|p| p.as_str())
            .ok_or("a row has no peer")?;
        assert!(PEERS.contains(&peer), "unknown peer {peer:?}");
        assert_eq!(object.get("size").and_then(|s| s.as_u64()), Some(64));
        let inflight = object
            .get("inflight")
            .and_then(|n| n.as_u64())
            .ok_or("a row has no inflight")?;
        assert!(inflight == 1 || inflight == 4, "inflight {inflight}");
        assert!(
            object.get("skipped").is_none(),
            "row skipped: {}",
            serde_json::to_string(row)?
        );
        for key in NUMBERS {
            let value = object.get(key).and_then(|v| v.as_f64());
            assert!(
                value.is_some_and(|v| v.is_finite() && v >= 0.0),
                "{peer}: {key} = {:?}",
                object.get(key)
            );
        }
        seen.insert((peer.to_owned(), inflight));
    }
    for peer in PEERS {
        assert!(seen.contains(&(peer.to_owned(), 1)), "no row for {peer}");
        let raw = peer.starts_with("raw-");
        assert_eq!(
            seen.contains(&(peer.to_owned(), 4)),
            !raw,
            "{peer} with 4 in flight"
        );
    }
    Ok(())
}

#[test]
fn peers_flag_restricts_the_rows() -> Result<(), Box<dyn std::error::Error>> {
    let rows = bench(&[
        "--json",
        "--peers",
        "raw-floor,shmesh-block",
        "--sizes",
        "4K",
        "--inflight",
        "1",
        "--duration",
        "10ms",
    ])?;
    let peers: BTreeSet<&str> = rows
        .iter()
        .filter_map(|r| r.get("peer").and_then(|p| p.as_str()))
        .collect();
    assert_eq!(peers, BTreeSet::from(["raw-floor", "shmesh-block"]));
    assert_eq!(rows.len(), 2);
    Ok(())
}

#[test]
fn structured_peers_measure_every_size_beside_shmesh_poll() -> Result<(), Box<dyn std::error::Error>>
{
    let rows = bench(&[
        "--json",
        "--peers",
        "shmesh-poll,shmesh-rkyv,shmesh-prost",
        "--sizes",
        "64,4K,64K",
        "--inflight",
        "1",
        "--duration",
        "50ms",
    ])?;
    assert_eq!(rows.len(), 9, "{rows:?}");
    for row in &rows {
        let peer = row.get("peer").and_then(|p| p.as_str()).ok_or("no peer")?;
        assert!(
            row.get("skipped").is_none(),
            "row skipped: {}",
            serde_json::to_string(row)?
        );
        assert!(
            row.get("calls").and_then(|c| c.as_u64()) > Some(0),
            "{peer}"
        );
        // Every row has shmesh-poll's row of its size to compare with.
        for ratio in ["p50_vs_shmesh_poll", "calls_per_s_vs_shmesh_poll"] {
            let value = row.get(ratio).and_then(|v| v.as_f64());
            assert!(
                value.is_some_and(|v| v.is_finite() && v > 0.0),
                "{peer}: {ratio}"
            );
        }
    }
    let peers: BTreeSet<&str> = rows
        .iter()
        .filter_map(|r| r.get("peer").and_then(|p| p.as_str()))
        .collect();
    assert_eq!(
        peers,
        BTreeSet::from(["shmesh-poll", "shmesh-rkyv", "shmesh-prost"])
    );
    Ok(())
}

#[test]
fn during_upgrades_adds_the_upgrading_row() -> Result<(), Box<dyn std::error::Error>> {
    let rows = bench(&[
        "--json",
        "--during-upgrades",
        "--peers",
        "shmesh-poll",
        "--sizes",
        "64",
        "--inflight",
        "1",
        "--duration",
        "100ms",
    ])?;
    let peers: BTreeSet<&str> = rows
        .iter()
        .filter_map(|r| r.get("peer").and_then(|p| p.as_str()))
        .collect();
    assert_eq!(
        peers,
        BTreeSet::from([
            "shmesh-poll",
            "shmesh-mediated",
            "shmesh-mediated-upgrading"
        ])
    );
    for row in &rows {
        assert!(row.get("skipped").is_none(), "row skipped: {row}");
    }
    Ok(())
}
