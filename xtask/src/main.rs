//! Project automation, run as `cargo xtask <command>`: jobs that need more than cargo
//! (external tools, a running daemon) written in Rust so they behave the same everywhere.
//! Each command lives in its own module; add a variant to `Command` for a new one.

mod bench_ipxe;
mod bench_rss;
mod bench_sim;
mod elf;
mod images;
mod l2;
mod process;
mod qemu_smoke;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Bearman project automation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmark GET /ipxe/{uuid} against nginx serving the same script as a static file
    BenchIpxe(bench_ipxe::Args),
    /// Measure the daemon's resident memory with 10,000 and 100,000 nodes inventoried
    BenchRss(bench_rss::Args),
    /// Run the simulator beside turmoil's floor harness at fleet shapes and print the ratios
    BenchSim(bench_sim::Args),
    /// Build the stage-1 and stage-2 boot images (kernel + initramfs) from Debian packages
    Images(images::Args),
    /// Boot QEMU VMs over the network through a real daemon (iPXE → stage 1 → kexec →
    /// stage 2 → Ready), then cut one VM's power and check Bearman fences and rebuilds it
    QemuSmoke(qemu_smoke::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::BenchIpxe(args) => bench_ipxe::run(args),
        Command::BenchRss(args) => bench_rss::run(args),
        Command::BenchSim(args) => bench_sim::run(args),
        Command::Images(args) => images::run(args),
        Command::QemuSmoke(args) => qemu_smoke::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
