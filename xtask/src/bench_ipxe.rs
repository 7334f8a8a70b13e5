//! `cargo xtask bench-ipxe`: how fast the daemon answers `GET /ipxe/{uuid}`, the request
//! every node makes on every boot, next to nginx serving the very same script as a file.
//!
//! nginx is the ceiling: a per-node lookup cannot beat a static file, so the ratio shows
//! what the daemon's lookup, state check and rendering cost. Both servers get the same wrk
//! load on the same machine, so figures compare within one run, not across machines.

use std::fmt::Display;
use std::fs::File;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context};
use serde_json::json;

use crate::process::{
    cargo_build, create_token, daemon_command, find_on_path, free_local_addr, log_tail, request_ok,
    wait_until_serving, ChildGuard,
};

/// Where Debian's nginx packages put the binary, which is not on a normal user's PATH.
const NGINX_PATH: &str = "/usr/sbin/nginx";
const INSTALL_HINT: &str = "run scripts/install-deps.sh";
const FLAVOR: &str = "hv";
/// Addresses in the benchmark pool, 10.128.0.10 to 10.128.255.250: one per node.
const POOL_ADDRESSES: u32 = 65_521;
const PROGRESS_EVERY: u32 = 1_000;

#[derive(clap::Args)]
pub struct Args {
    /// Nodes to register; every measured request asks for a random one of them
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=i64::from(POOL_ADDRESSES)))]
    nodes: u32,
    /// wrk threads
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    threads: u32,
    /// wrk connections, kept open for the whole run
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,
    /// Measured run per server, e.g. 10s or 1m
    #[arg(long, default_value = "10s", value_parser = parse_seconds)]
    duration: u64,
    /// Unmeasured run before each measured one, so both servers are warm (0s skips it)
    #[arg(long, default_value = "2s", value_parser = parse_seconds)]
    warmup: u64,
    /// Requests in flight while registering and provisioning the nodes
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    setup_concurrency: u32,
    /// Keep the data directory, logs, nginx files and wrk scripts in this (new or empty)
    /// directory instead of a temporary one, e.g. to profile the populated daemon later
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Stop after setting up both servers (nodes registered, wrk scripts written); with
    /// --work-dir this prepares a data directory for profiling without loading it
    #[arg(long, requires = "work_dir")]
    setup_only: bool,
}

/// Accepts wrk's duration syntax (`10`, `10s`, `2m`, `1h`) and returns seconds.
fn parse_seconds(text: &str) -> Result<u64, String> {
    let (digits, scale) = match text.as_bytes().last() {
        Some(b's') => (&text[..text.len() - 1], 1),
        Some(b'm') => (&text[..text.len() - 1], 60),
        Some(b'h') => (&text[..text.len() - 1], 3600),
        _ => (text, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| {
            format!("{text:?}: expected a whole number of seconds, minutes or hours, e.g. 10s, 1m")
        })
}

pub fn run(args: Args) -> anyhow::Result<()> {
    ensure!(
        args.connections >= args.threads,
        "--connections {} is fewer than --threads {}: wrk needs at least one connection per thread",
        args.connections,
        args.threads
    );
    ensure!(args.duration > 0, "--duration must be longer than 0s");
    // Before the build, which takes minutes the first time: a missing tool should fail fast.
    let tools = Tools::find()?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask lives inside the workspace")?;
    progress("building the daemon: cargo build --release -p bearman");
    let daemon = cargo_build(workspace, &["--release", "-p", "bearman"], &[], "bearman")?;
    // A kept work directory must start empty: the token and nodes must be the only ones.
    let work = match &args.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let empty = std::fs::read_dir(dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .next()
                .is_none();
            ensure!(empty, "--work-dir {} is not empty", dir.display());
            WorkDir::Kept(std::fs::canonicalize(dir)?)
        }
        None => WorkDir::Temporary(
            tempfile::Builder::new()
                .prefix("bench-ipxe-")
                .tempdir()
                .context("creating a temporary directory")?,
        ),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        tokio::select! {
            result = bench(&args, &tools, &daemon, work.path()) => result,
            // Returning drops the benchmark future and the process guards in it, so the
            // daemon, nginx and wrk stop before the temporary directory is removed.
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    })
}

/// Where the benchmark keeps its files: removed afterwards unless the user chose it.
enum WorkDir {
    Temporary(tempfile::TempDir),
    Kept(PathBuf),
}

impl WorkDir {
    fn path(&self) -> &Path {
        match self {
            WorkDir::Temporary(dir) => dir.path(),
            WorkDir::Kept(path) => path,
        }
    }
}

struct Tools {
    nginx: PathBuf,
    wrk: PathBuf,
}

impl Tools {
    fn find() -> anyhow::Result<Tools> {
        let nginx = Some(PathBuf::from(NGINX_PATH))
            .filter(|path| path.is_file())
            .or_else(|| find_on_path("nginx"));
        let wrk = find_on_path("wrk");
        match (nginx, wrk) {
            (Some(nginx), Some(wrk)) => Ok(Tools { nginx, wrk }),
            (nginx, wrk) => {
                let mut missing = Vec::new();
                if nginx.is_none() {
                    missing.push(format!("nginx (not at {NGINX_PATH} nor on PATH)"));
                }
                if wrk.is_none() {
                    missing.push("wrk (not on PATH)".to_string());
                }
                bail!("missing {}: {INSTALL_HINT}", missing.join(" and "))
            }
        }
    }
}

fn progress(message: impl Display) {
    eprintln!("bench-ipxe: {message}");
}

pub(crate) fn uuid(index: u32) -> String {
    format!("00000000-0000-4000-8000-{index:012x}")
}

/// A locally administered MAC (02:…), unique per index.
pub(crate) fn mac(index: u32) -> String {
    let [a, b, c, d] = index.to_be_bytes();
    format!("02:00:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// Runs `call` once per node index with at most `concurrency` in flight; the first error
/// stops the phase (dropping the JoinSet aborts the other workers).
pub(crate) async fn for_each_node<F, Fut>(
    phase: &'static str,
    nodes: u32,
    concurrency: u32,
    call: F,
) -> anyhow::Result<()>
where
    F: Fn(u32) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let started = Instant::now();
    let call = Arc::new(call);
    let next = Arc::new(AtomicU32::new(0));
    let done = Arc::new(AtomicU32::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(nodes) {
        let (call, next, done) = (call.clone(), next.clone(), done.clone());
        workers.spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= nodes {
                    return anyhow::Ok(());
                }
                call(index).await?;
                let finished = done.fetch_add(1, Ordering::Relaxed) + 1;
                if finished % PROGRESS_EVERY == 0 && finished < nodes {
                    progress(format!("{phase}: {finished}/{nodes}"));
                }
            }
        });
    }
    while let Some(joined) = workers.join_next().await {
        joined.with_context(|| format!("{phase}: a worker panicked"))??;
    }
    let seconds = started.elapsed().as_secs_f64();
    progress(format!(
        "{phase}: {nodes}/{nodes} in {seconds:.1}s ({:.0}/s)",
        f64::from(nodes) / seconds
    ));
    Ok(())
}

/// Sets up the daemon and nginx, loads each in turn and prints the comparison.
async fn bench(args: &Args, tools: &Tools, daemon: &Path, work: &Path) -> anyhow::Result<()> {
    let data_dir = work.join("data");
    progress("creating an admin token");
    let token = create_token(daemon, &data_dir, "bench")?;
    let bearman_log = work.join("bearman.log");
    let (_bearman, bearman_addr) = start_bearman(daemon, &data_dir, &bearman_log).await?;
    populate(bearman_addr, &token, args.nodes, args.setup_concurrency).await?;

    let sample_path = format!("/ipxe/{}", uuid(0));
    let script = request_ok(bearman_addr, "GET", &sample_path, None, None)
        .await?
        .body;
    let nginx_dir = work.join("nginx");
    let nginx_log = nginx_dir.join("error.log");
    let (_nginx, nginx_addr) = start_nginx(tools, &nginx_dir, &sample_path, &script).await?;

    let (bearman_lua, nginx_lua) = write_lua_scripts(work, args.nodes, &sample_path)?;
    if args.setup_only {
        progress(format!(
            "set up in {}: data directory data/, nginx config nginx/nginx.conf, wrk scripts \
             bearman.lua and nginx.lua; not loading (--setup-only)",
            work.display()
        ));
        return Ok(());
    }
    let bearman_report = load("bearman", args, tools, bearman_addr, &bearman_lua, work).await?;
    let nginx_report = load("nginx", args, tools, nginx_addr, &nginx_lua, work).await?;
    print_table(args, &bearman_report, &nginx_report);

    let mut failures = Vec::new();
    for (name, report, log) in [
        ("bearman", &bearman_report, &bearman_log),
        ("nginx", &nginx_report, &nginx_log),
    ] {
        if report.non_2xx > 0 {
            failures.push(format!(
                "{name}: {} of {} responses were not 2xx; {}",
                report.non_2xx,
                report.requests,
                log_tail(log)
            ));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

pub(crate) async fn start_bearman(
    daemon: &Path,
    data_dir: &Path,
    log_path: &Path,
) -> anyhow::Result<(ChildGuard, SocketAddr)> {
    let addr = free_local_addr()?;
    progress(format!(
        "starting bearman on {addr} (log {})",
        log_path.display()
    ));
    let log = File::create(log_path).context("creating the daemon log")?;
    // The benchmark's made-up machines are let in as they register (a lab's policy).
    std::fs::create_dir_all(data_dir).context("creating the data directory")?;
    let config = data_dir.join("bench.toml");
    // wrk is one source sending thousands of requests a second: a budget it never
    // exhausts keeps the per-source limiter's check in the measured path without
    // refusing anything.
    std::fs::write(
        &config,
        "[enrollment]\nauto_accept = true\n[http]\nrate_per_s = 1000000\nrate_burst = 10000000\n",
    )
    .context("writing the daemon config")?;
    // Registration assigns the default flavor, so no per-node update is needed.
    let mut bearman = ChildGuard::spawn(
        "bearman",
        daemon_command(daemon)
            .args([
                "serve",
                "--listen",
                &addr.to_string(),
                "--default-flavor",
                FLAVOR,
                "--config",
            ])
            .arg(&config)
            .arg("--data-dir")
            .arg(data_dir)
            .stdout(log.try_clone()?)
            .stderr(log),
    )?;
    wait_until_serving(&mut bearman, addr, "/ipxe", log_path).await?;
    Ok((bearman, addr))
}

/// Creates the flavor and pool, registers the nodes and boots each once.
async fn populate(
    addr: SocketAddr,
    token: &str,
    nodes: u32,
    concurrency: u32,
) -> anyhow::Result<()> {
    progress(format!("creating flavor {FLAVOR} and pool bench"));
    let flavor = json!({
        "name": FLAVOR,
        "kernel": {"url": "/images/hv/vmlinuz", "sha256": "ab".repeat(32)},
        "initrds": [{"url": "/images/hv/initrd.img", "sha256": "cd".repeat(32)}],
        "cmdline_template": "console=ttyS0 hostname={hostname} ip={ip}",
    });
    request_ok(addr, "POST", "/api/v1/flavors", Some(token), Some(&flavor)).await?;
    let pool = json!({
        "name": "bench",
        "purpose": "node",
        "cidr": "10.128.0.0/16",
        "range_start": "10.128.0.10",
        "range_end": "10.128.255.250",
        "gateway": "10.128.0.1",
        "dns": ["10.128.0.1"],
        "mtu": 9000,
    });
    request_ok(addr, "POST", "/api/v1/pools", Some(token), Some(&pool)).await?;

    for_each_node("registering", nodes, concurrency, move |index| async move {
        let path = format!("/ipxe/{}/register", uuid(index));
        let body = json!({
            "serial": format!("S{index}"),
            "nics": [{"name": "eth0", "mac": mac(index)}],
        });
        request_ok(addr, "POST", &path, None, Some(&body))
            .await
            .map(drop)
    })
    .await?;
    // The first fetch moves a node from registered to provisioning, a write; fetching each
    // once now leaves only the steady-state read for the measured runs.
    for_each_node(
        "provisioning",
        nodes,
        concurrency,
        move |index| async move {
            let path = format!("/ipxe/{}", uuid(index));
            let script = request_ok(addr, "GET", &path, None, None).await?.text();
            // A node without its flavor would get the stage-1 script: measure the real thing.
            ensure!(
                script.contains("/images/hv/vmlinuz"),
                "GET {path} did not return the {FLAVOR} target script:\n{script}"
            );
            Ok(())
        },
    )
    .await
}

/// Serves `script` at `path` from `dir`/www, checking nginx returns the same bytes.
async fn start_nginx(
    tools: &Tools,
    dir: &Path,
    path: &str,
    script: &[u8],
) -> anyhow::Result<(ChildGuard, SocketAddr)> {
    let addr = free_local_addr()?;
    let file = dir.join("www").join(path.trim_start_matches('/'));
    std::fs::create_dir_all(file.parent().context("the script path has a directory")?)?;
    std::fs::write(&file, script).with_context(|| format!("writing {}", file.display()))?;
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, nginx_config(dir, addr))
        .with_context(|| format!("writing {}", conf.display()))?;
    progress(format!(
        "starting nginx on {addr}, serving {path} ({} bytes)",
        script.len()
    ));
    let mut nginx = ChildGuard::spawn(
        "nginx",
        Command::new(&tools.nginx)
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(File::create(dir.join("stderr.log"))?),
    )?;
    let served = wait_until_serving(&mut nginx, addr, path, &dir.join("error.log")).await?;
    ensure!(
        served.body == script,
        "nginx serves {path} with different bytes than bearman"
    );
    Ok((nginx, addr))
}

/// Writes the wrk scripts for bearman and nginx and returns their paths.
fn write_lua_scripts(
    work: &Path,
    nodes: u32,
    nginx_path: &str,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    // LuaJIT's math.random is never seeded here, so every run asks for the same sequence.
    let uuids: String = (0..nodes)
        .map(|index| format!("  \"{}\",\n", uuid(index)))
        .collect();
    let bearman = work.join("bearman.lua");
    std::fs::write(
        &bearman,
        format!(
            "-- Generated by `cargo xtask bench-ipxe`: every request asks for a random registered\n\
             -- node, so the daemon does a real per-node lookup, not one hot row.\n\
             local uuids = {{\n{uuids}}}\n\
             request = function()\n  return wrk.format(\"GET\", \"/ipxe/\" .. uuids[math.random(#uuids)])\nend\n"
        ),
    )?;
    // The same request() hook with a fixed path, so that wrk spends the same Lua work per
    // request on both servers and only the servers differ.
    let nginx = work.join("nginx.lua");
    std::fs::write(
        &nginx,
        format!(
            "-- Generated by `cargo xtask bench-ipxe`: the one static copy of a node's script.\n\
             request = function()\n  return wrk.format(\"GET\", \"{nginx_path}\")\nend\n"
        ),
    )?;
    Ok((bearman, nginx))
}

fn print_table(args: &Args, bearman: &WrkReport, nginx: &WrkReport) {
    let plural = |n: u32, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "bench-ipxe: GET /ipxe/{{uuid}}, {} nodes, wrk {} {} {}s, {cores} cores",
        args.nodes,
        plural(args.threads, "thread"),
        plural(args.connections, "connection"),
        args.duration
    );
    println!("{:<18}{:<14}{:<10}p99", "server", "requests/s", "p50");
    for (name, report) in [("bearman (sqlite)", bearman), ("nginx static", nginx)] {
        println!(
            "{name:<18}{:<14.0}{:<10}{}",
            report.requests_per_sec,
            format_latency(report.p50_us),
            format_latency(report.p99_us)
        );
    }
    println!(
        "ratio bearman/nginx: {:.2}",
        bearman.requests_per_sec / nginx.requests_per_sec
    );
}

/// The smallest configuration that serves one directory. The temp paths keep nginx away
/// from /var/lib/nginx, which a non-root user cannot create.
fn nginx_config(dir: &Path, addr: SocketAddr) -> String {
    let dir = dir.display();
    // As root, workers would switch to `nobody`, which cannot enter the 0700 temp dir.
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root;\n"
    } else {
        ""
    };
    format!(
        "daemon off;\n\
         master_process on;\n\
         worker_processes auto;\n\
         {user}\
         pid {dir}/nginx.pid;\n\
         error_log {dir}/error.log;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n\
         \x20 access_log off;\n\
         \x20 client_body_temp_path {dir}/client_body;\n\
         \x20 proxy_temp_path {dir}/proxy;\n\
         \x20 fastcgi_temp_path {dir}/fastcgi;\n\
         \x20 uwsgi_temp_path {dir}/uwsgi;\n\
         \x20 scgi_temp_path {dir}/scgi;\n\
         \x20 server {{\n\
         \x20   listen {addr};\n\
         \x20   root {dir}/www;\n\
         \x20   location / {{ default_type text/plain; }}\n\
         \x20 }}\n\
         }}\n"
    )
}

/// A warm-up run, then the measured one; returns what wrk measured.
async fn load(
    server: &'static str,
    args: &Args,
    tools: &Tools,
    addr: SocketAddr,
    script: &Path,
    work: &Path,
) -> anyhow::Result<WrkReport> {
    if args.warmup > 0 {
        progress(format!("{server}: warming up for {}s", args.warmup));
        let warmup = wrk(server, args, args.warmup, tools, addr, script, work).await?;
        if warmup.non_2xx > 0 {
            progress(format!(
                "{server}: warning: {} non-2xx responses during warm-up",
                warmup.non_2xx
            ));
        }
    }
    progress(format!("{server}: measuring for {}s", args.duration));
    let report = wrk(server, args, args.duration, tools, addr, script, work).await?;
    if let Some(errors) = &report.socket_errors {
        progress(format!("{server}: warning: wrk socket errors: {errors}"));
    }
    Ok(report)
}

async fn wrk(
    server: &'static str,
    args: &Args,
    seconds: u64,
    tools: &Tools,
    addr: SocketAddr,
    script: &Path,
    work: &Path,
) -> anyhow::Result<WrkReport> {
    // wrk's output is small, but files rather than pipes mean nobody has to drain them
    // while polling for the exit.
    let stdout_path = work.join(format!("wrk-{server}.out"));
    let stderr_path = work.join(format!("wrk-{server}.err"));
    let mut child = ChildGuard::spawn(
        "wrk",
        Command::new(&tools.wrk)
            .arg(format!("--threads={}", args.threads))
            .arg(format!("--connections={}", args.connections))
            .arg(format!("--duration={seconds}s"))
            .arg("--latency")
            .arg("--script")
            .arg(script)
            .arg(format!("http://{addr}/"))
            .stdout(File::create(&stdout_path)?)
            .stderr(File::create(&stderr_path)?),
    )?;
    let status = child.wait().await?;
    let stdout = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    ensure!(
        status.success(),
        "wrk against {server} failed ({status}):\n{}{}",
        stdout,
        stderr
    );
    parse_wrk(&stdout)
        .with_context(|| format!("reading wrk's report on {server}:\n{stdout}{stderr}"))
}

#[derive(Debug, PartialEq)]
struct WrkReport {
    requests: u64,
    requests_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    /// wrk's "Non-2xx or 3xx responses" (in fact every status of 400 and above).
    non_2xx: u64,
    /// wrk's "Socket errors" line, present only when there were some.
    socket_errors: Option<String>,
}

fn parse_wrk(output: &str) -> anyhow::Result<WrkReport> {
    let mut requests = None;
    let mut requests_per_sec = None;
    let mut p50_us = None;
    let mut p99_us = None;
    let mut non_2xx = 0;
    let mut socket_errors = None;
    for line in output.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("50%"), Some(value)) => p50_us = Some(parse_latency_us(value)?),
            (Some("99%"), Some(value)) => p99_us = Some(parse_latency_us(value)?),
            (Some("Requests/sec:"), Some(value)) => requests_per_sec = Some(value.parse::<f64>()?),
            (Some(count), Some("requests")) => requests = count.parse::<u64>().ok(),
            _ => {}
        }
        if let Some(count) = line.strip_prefix("Non-2xx or 3xx responses:") {
            non_2xx = count.trim().parse()?;
        }
        if let Some(errors) = line.strip_prefix("Socket errors:") {
            socket_errors = Some(errors.trim().to_string());
        }
    }
    let requests = requests.context("no \"N requests in\" line")?;
    ensure!(requests > 0, "wrk completed no requests");
    Ok(WrkReport {
        requests,
        requests_per_sec: requests_per_sec.context("no Requests/sec line")?,
        p50_us: p50_us.context("no 50% latency line (was --latency given?)")?,
        p99_us: p99_us.context("no 99% latency line (was --latency given?)")?,
        non_2xx,
        socket_errors,
    })
}

/// wrk prints latencies as a number with a unit: `812.00us`, `1.25ms`, `2.00s`, `1.00m`.
fn parse_latency_us(text: &str) -> anyhow::Result<f64> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("latency {text:?} has no unit"))?;
    let (number, unit) = text.split_at(split);
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => bail!("latency {text:?}: unknown unit {unit:?}"),
    };
    Ok(number
        .parse::<f64>()
        .with_context(|| format!("latency {text:?}"))?
        * scale)
}

fn format_latency(us: f64) -> String {
    if us < 1e3 {
        format!("{us:.0}us")
    } else if us < 1e6 {
        format!("{:.2}ms", us / 1e3)
    } else {
        format!("{:.2}s", us / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK_OUTPUT: &str = "\
Running 10s test @ http://127.0.0.1:8080/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   635.91us    0.89ms  12.92ms   93.69%
    Req/Sec    56.20k     8.07k   62.00k    86.54%
  Latency Distribution
     50%  250.00us
     75%  491.00us
     90%  700.00us
     99%    5.00ms
  565449 requests in 10.00s, 86.28MB read
  Socket errors: connect 0, read 3, write 0, timeout 0
  Non-2xx or 3xx responses: 2
Requests/sec:  56542.46
Transfer/sec:      8.63MB
";

    #[test]
    fn parses_wrk_report() {
        let report = parse_wrk(WRK_OUTPUT).unwrap();
        assert_eq!(
            report,
            WrkReport {
                requests: 565_449,
                requests_per_sec: 56_542.46,
                p50_us: 250.0,
                p99_us: 5_000.0,
                non_2xx: 2,
                socket_errors: Some("connect 0, read 3, write 0, timeout 0".into()),
            }
        );
    }

    #[test]
    fn a_report_without_latency_distribution_is_refused() {
        let without: String = WRK_OUTPUT
            .lines()
            .filter(|l| !l.contains('%'))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(parse_wrk(&without).is_err());
    }

    #[test]
    fn durations_and_latencies_parse() {
        assert_eq!(parse_seconds("10s"), Ok(10));
        assert_eq!(parse_seconds("2m"), Ok(120));
        assert_eq!(parse_seconds("7"), Ok(7));
        assert!(parse_seconds("1.5s").is_err());
        assert!(parse_seconds("").is_err());
        assert_eq!(parse_latency_us("1.25ms").unwrap(), 1250.0);
        assert_eq!(parse_latency_us("2.00s").unwrap(), 2e6);
        assert!(parse_latency_us("12").is_err());
        assert_eq!(format_latency(812.4), "812us");
        assert_eq!(format_latency(1250.0), "1.25ms");
    }

    #[test]
    fn uuids_and_macs_are_distinct_and_well_formed() {
        assert_eq!(uuid(255), "00000000-0000-4000-8000-0000000000ff");
        assert_eq!(mac(0x0102_0304), "02:00:01:02:03:04");
        assert!(bearman_proto::uuid::NodeUuid::parse(&uuid(POOL_ADDRESSES)).is_ok());
    }
}
