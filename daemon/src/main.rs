//! `bearman`: the daemon (`bearman serve`) and the operator CLI that talks to it.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
