//! `weft`: the userspace agent of weft's eBPF fast datapath.
//!
//! - `weft run` sets up the datapath on this host (devices, eBPF programs, maps),
//!   keeps it equal to the peers file and serves status on a local socket. The
//!   datapath outlives it; the next `weft run` adopts it.
//! - `weft status` asks a running agent and prints Weave-style status.
//! - `weft reset` removes the datapath.
//! - `weft install-cni` installs the CNI plugin, which is this binary run as
//!   `weft-cni`.
//! - `weft cipher-speed` measures how fast one core seals and opens encrypted
//!   sleeve datagrams.
//!
//! Modules, one concern each: [`cli`] (arguments), [`peers`] (the static peers file),
//! [`netdev`] (links via rtnetlink), [`loader`] (eBPF load/attach),
//! [`maps`] (the map chokepoint), [`datapath`] (desired state -> maps), [`control`]
//! (the local socket), [`status`] (Weave-style output), [`api`] (Weave's HTTP status
//! endpoints), [`metrics`] (Prometheus), [`xfrm`] (IPsec SAs and policies),
//! [`kube_peers`] (peers from the Kubernetes API), [`agent`] (the lifecycle),
//! [`ipam`] (address blocks and allocations), [`cni`] (the CNI plugin).

mod agent;
mod api;
mod cli;
mod cni;
mod control;
mod datapath;
mod esp;
mod ipam;
#[cfg(feature = "kubernetes")]
mod kube_peers;
mod loader;
mod maps;
mod metrics;
mod netdev;
mod node;
#[allow(dead_code)]
mod offload;
mod peering;
mod peers;
mod sleeve_io;
mod status;
#[allow(dead_code)]
mod tap;
#[allow(dead_code)]
mod udp;
mod xfrm;

use std::process::ExitCode;

use tracing_subscriber::{
    filter::{LevelFilter, Targets},
    prelude::*,
};

use crate::cli::{CipherSpeedArgs, Command, StatusArgs, StatusWhat};

fn main() -> ExitCode {
    if cni::is_plugin_invocation() {
        return cni::main();
    }
    let cli = cli::parse();
    // `WEFT_LOG=debug`, or directives like `WEFT_LOG=weft=debug,aya=info`.
    // tracing's `Targets` takes the same `weft=debug,aya=info` directives (and a bare
    // level) as its EnvFilter, without EnvFilter's regex engine (~0.4 MB of a 2.8 MB
    // agent); per-span and per-field filters are what it leaves out.
    let filter = match std::env::var("WEFT_LOG") {
        Ok(v) => match v.parse::<Targets>() {
            Ok(filter) => filter,
            Err(e) => {
                eprintln!(
                    "weft: WEFT_LOG={v:?}: {e} (try a level like debug, or weft=debug,aya=info)"
                );
                return ExitCode::FAILURE;
            }
        },
        // The Kubernetes client logs each failed request itself, with the answer's
        // body; the agent's own warning says what failed (`WEFT_LOG=debug` shows both).
        Err(_) => Targets::new()
            .with_default(LevelFilter::INFO)
            .with_target("kube_client", LevelFilter::OFF),
    };
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(filter)
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
            Command::Run(args) => agent::run(*args).await,
            Command::Status(args) => print_status(args).await,
            Command::Reset(args) => agent::reset(args).await,
            Command::Connect(args) => control::targets(&args.socket, true, &args.peers)
                .await
                .map_err(Into::into),
            Command::Forget(args) => control::targets(&args.socket, false, &args.peers)
                .await
                .map_err(Into::into),
            Command::InstallCni(args) => cni::install(&args),
            Command::CipherSpeed(args) => print_cipher_speed(&args),
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

/// `weft cipher-speed [--datagram-len N] [--millis MS] [--json]`.
fn print_cipher_speed(args: &CipherSpeedArgs) -> anyhow::Result<()> {
    let s = weft::sleeve::crypto::measure_cipher_speed(
        usize::from(args.datagram_len),
        std::time::Duration::from_millis(args.millis),
    )?;
    if args.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        println!(
            "XSalsa20-Poly1305, one core, {}-byte datagrams: seal {:.0} MB/s, open {:.0} MB/s",
            s.datagram_len,
            s.seal_bytes_per_sec / 1e6,
            s.open_bytes_per_sec / 1e6
        );
    }
    Ok(())
}

/// `weft status [connections|peers] [--json]`.
async fn print_status(args: StatusArgs) -> anyhow::Result<()> {
    let status = control::query(&args.socket).await?;
    let text = if args.json {
        serde_json::to_string_pretty(&status)? + "\n"
    } else {
        match args.what {
            None => status::render_summary(&status),
            Some(StatusWhat::Connections) => {
                status::render_connections(&status, status::Style::Weft)
            }
            Some(StatusWhat::Peers) => status::render_peers(&status),
        }
    };
    print!("{text}");
    Ok(())
}
