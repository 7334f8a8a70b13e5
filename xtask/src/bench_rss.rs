//! `cargo xtask bench-rss`: how much memory `bearman serve` holds with a fleet inventoried.
//!
//! For each fleet size, a fresh daemon on SQLite (the embedded default): its resident set
//! idle, with no node (the baseline, measured in the same run), then after every node
//! registered and fetched its target script once, and after a second full pass of
//! `GET /ipxe/{uuid}` (the boot hot path's caches full: node records, rendered scripts),
//! with the peak (`VmHWM`). Read from `/proc/<pid>/status`; figures are the kernel's, so
//! they hold on any machine with the same binary, give or take the allocator's arenas.

use std::fmt::Display;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context};
use serde_json::json;

use crate::bench_ipxe::{for_each_node, mac, start_bearman, uuid};
use crate::process::{cargo_build, create_token, request_ok};

const FLAVOR: &str = "hv";

#[derive(clap::Args)]
pub struct Args {
    /// Fleet sizes to measure, each on a fresh daemon (comma-separated)
    #[arg(long, value_delimiter = ',', default_values_t = vec![10_000u32, 100_000], value_parser = clap::value_parser!(u32).range(1..=250_000))]
    nodes: Vec<u32>,
    /// Requests in flight while registering and fetching
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    concurrency: u32,
    /// The bearman binary to measure (default: built here with cargo build --release -p bearman)
    #[arg(long)]
    daemon: Option<PathBuf>,
}

fn progress(message: impl Display) {
    eprintln!("bench-rss: {message}");
}

/// Resident and peak resident memory of process `pid`, in KiB.
fn memory_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("{path} has no {name}"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// One fleet size's figures, KiB.
struct Measured {
    nodes: u32,
    idle: u64,
    populated: u64,
    warm: u64,
    peak: u64,
    database_bytes: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask lives inside the workspace")?;
    let daemon = match &args.daemon {
        Some(path) => path.clone(),
        None => {
            progress("building the daemon: cargo build --release -p bearman");
            cargo_build(workspace, &["--release", "-p", "bearman"], &[], "bearman")?
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut results = Vec::new();
    for &nodes in &args.nodes {
        let work = tempfile::Builder::new()
            .prefix("bench-rss-")
            .tempdir()
            .context("creating a temporary directory")?;
        results.push(runtime.block_on(measure(&daemon, work.path(), nodes, args.concurrency))?);
    }
    println!(
        "\n{:>8}  {:>10}  {:>10}  {:>10}  {:>10}  {:>14}  {:>10}",
        "nodes", "idle MiB", "populated", "warm MiB", "peak MiB", "per node (B)", "db MiB"
    );
    let mib = |kib: u64| kib as f64 / 1024.0;
    for m in &results {
        println!(
            "{:>8}  {:>10.1}  {:>10.1}  {:>10.1}  {:>10.1}  {:>14.0}  {:>10.1}",
            m.nodes,
            mib(m.idle),
            mib(m.populated),
            mib(m.warm),
            mib(m.peak),
            (m.warm.saturating_sub(m.idle) * 1024) as f64 / f64::from(m.nodes),
            m.database_bytes as f64 / (1024.0 * 1024.0)
        );
    }
    println!(
        "(idle: the same binary with no node, the baseline; populated: every node registered \
         and booted once; warm: after a second GET /ipxe/{{uuid}} for every node; peak: VmHWM)"
    );
    Ok(())
}

async fn measure(
    daemon: &Path,
    work: &Path,
    nodes: u32,
    concurrency: u32,
) -> anyhow::Result<Measured> {
    progress(format!(
        "{nodes} nodes: a fresh daemon in {}",
        work.display()
    ));
    let data_dir = work.join("data");
    let token = create_token(daemon, &data_dir, "bench")?;
    let log = work.join("bearman.log");
    let (bearman, addr) = start_bearman(daemon, &data_dir, &log).await?;
    let pid = bearman.id();
    let (idle, _) = memory_kib(pid)?;
    let flavor = json!({
        "name": FLAVOR,
        "kernel": {"url": "/images/hv/vmlinuz", "sha256": "ab".repeat(32)},
        "initrds": [{"url": "/images/hv/initrd.img", "sha256": "cd".repeat(32)}],
        "cmdline_template": "console=ttyS0 hostname={hostname} ip={ip}",
    });
    request_ok(addr, "POST", "/api/v1/flavors", Some(&token), Some(&flavor)).await?;
    // 10.128.0.10-10.131.255.250: room for 262,000 nodes.
    let pool = json!({
        "name": "bench",
        "purpose": "node",
        "cidr": "10.128.0.0/14",
        "range_start": "10.128.0.10",
        "range_end": "10.131.255.250",
        "gateway": "10.128.0.1",
        "dns": ["10.128.0.1"],
        "mtu": 9000,
    });
    request_ok(addr, "POST", "/api/v1/pools", Some(&token), Some(&pool)).await?;
    for_each_node("registering", nodes, concurrency, move |index| async move {
        let body = json!({
            "serial": format!("S{index}"),
            "vendor": "Dell Inc.",
            "model": "PowerEdge R650",
            "nics": [
                {"name": "eno1", "mac": mac(index), "speed_mbps": 25000},
            ],
            "firmware": {"bios": "2.19.1", "bmc": "7.10"},
        });
        request_ok(
            addr,
            "POST",
            &format!("/ipxe/{}/register", uuid(index)),
            None,
            Some(&body),
        )
        .await
        .map(drop)
    })
    .await?;
    let mut after_passes = Vec::new();
    for pass in ["provisioning", "fetching again"] {
        for_each_node(pass, nodes, concurrency, move |index| async move {
            let path = format!("/ipxe/{}", uuid(index));
            let script = request_ok(addr, "GET", &path, None, None).await?.text();
            ensure!(
                script.contains("/images/hv/vmlinuz"),
                "GET {path} did not return the {FLAVOR} target script"
            );
            Ok(())
        })
        .await?;
        after_passes.push(memory_kib(pid)?);
    }
    let populated = after_passes[0].0;
    let (warm, peak) = after_passes[1];
    let database_bytes = std::fs::read_dir(&data_dir)
        .with_context(|| format!("reading {}", data_dir.display()))?
        .filter_map(Result::ok)
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("bearman.db")
        })
        .filter_map(|entry| entry.metadata().ok())
        .map(|meta| meta.len())
        .sum();
    progress(format!(
        "{nodes} nodes: RSS {:.1} MiB idle, {:.1} MiB warm, peak {:.1} MiB",
        idle as f64 / 1024.0,
        warm as f64 / 1024.0,
        peak as f64 / 1024.0
    ));
    drop(bearman);
    Ok(Measured {
        nodes,
        idle,
        populated,
        warm,
        peak,
        database_bytes,
    })
}
