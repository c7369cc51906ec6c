//! `weft`: the userspace agent of weft's eBPF fast datapath.
//!
//! - `weft run` sets up the datapath on this host (devices, eBPF programs, maps),
//!   keeps it equal to the peers file, serves status on a local socket, and removes
//!   everything it set up when it stops.
//! - `weft status` asks a running agent and prints Weave-style status.
//!
//! Modules, one concern each: [`cli`] (arguments), [`peers`] (the static peers file),
//! [`netdev`] (links and neighbours via rtnetlink), [`loader`] (eBPF load/attach),
//! [`maps`] (the map chokepoint), [`datapath`] (desired state -> maps), [`control`]
//! (the local socket), [`status`] (Weave-style output), [`agent`] (the lifecycle).

mod agent;
mod cli;
mod control;
mod datapath;
mod loader;
mod maps;
mod netdev;
mod peers;
mod status;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::{EnvFilter, filter::LevelFilter};

use crate::cli::{Cli, Command, StatusArgs, StatusWhat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `WEFT_LOG=debug`, or directives like `WEFT_LOG=weft=debug,aya=info`.
    let filter = match EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .with_env_var("WEFT_LOG")
        .from_env()
    {
        Ok(filter) => filter,
        Err(e) => {
            eprintln!("weft: WEFT_LOG: {e} (try a level like debug, or weft=debug,aya=info)");
            return ExitCode::FAILURE;
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => agent::run(args).await,
            Command::Status(args) => print_status(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `weft status [connections|peers] [--json]`.
async fn print_status(args: StatusArgs) -> anyhow::Result<()> {
    let status = control::query(&args.socket).await?;
    let text = if args.json {
        serde_json::to_string_pretty(&status)? + "\n"
    } else {
        match args.what {
            None => status::render_summary(&status),
            Some(StatusWhat::Connections) => status::render_connections(&status),
            Some(StatusWhat::Peers) => status::render_peers(&status),
        }
    };
    print!("{text}");
    Ok(())
}
