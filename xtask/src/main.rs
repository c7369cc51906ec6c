//! weft's task runner: `cargo xtask <task>` builds the eBPF object and the agent, runs
//! the tests and lints, and starts the demo. One module per task; a new task is a new
//! module plus one variant of [`Task`].

mod arch;
mod bench;
mod build;
mod demo;
mod exec;
mod fuzz;
mod image;
mod lint;
mod setup;
mod test;
mod vm;
mod workspace;

use std::{process::ExitCode, time::Instant};

use clap::{Parser, Subcommand};

use crate::workspace::Workspace;

/// Command line of `cargo xtask`.
#[derive(Debug, Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "weft's build, test and demo tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

/// The tasks. Each one lives in the module of the same name.
#[derive(Debug, Subcommand)]
enum Task {
    /// Check and install what the other tasks need: the pinned toolchain's components,
    /// bpf-linker and cargo-fuzz (in `.tools`), the Debian tools the tests use, and bpffs.
    Setup,
    /// Build the eBPF object, then the agent that embeds it (or, with `--target`, static
    /// agents for x86_64 and aarch64, each embedding its own architecture's object).
    Build(build::Cli),
    /// Build, then run unit tests, root integration tests (also in a kernel-6.1 VM) and
    /// lints.
    Test,
    /// Build, then run the multi-host demo in network namespaces (needs root).
    Demo,
    /// rustfmt and clippy (with `-D warnings`) over the host crates and the eBPF crate.
    Lint,
    /// Build the fuzz targets (`agent/fuzz`) and run each for a while (default 10 s).
    Fuzz(fuzz::Args),
    /// Build, then benchmark weft against kernel VXLAN and the raw underlay (needs root).
    Bench(bench::Args),
    /// Build the static agents, then the `FROM scratch` images around them
    /// (`localhost/weft:<version>[-amd64|-arm64]`, OCI archives in `target/image/`).
    Image(image::Args),
    /// Build, then run kernel-dependent integration tests in a QEMU guest with Debian
    /// 12's 6.1 kernel (no TCX: the netlink attach path).
    VmTest(vm::Args),
}

impl Task {
    /// The subcommand's name, for messages.
    fn name(&self) -> &'static str {
        match self {
            Self::Setup => "setup",
            Self::Build(_) => "build",
            Self::Test => "test",
            Self::Demo => "demo",
            Self::Lint => "lint",
            Self::Fuzz(_) => "fuzz",
            Self::Bench(_) => "bench",
            Self::Image(_) => "image",
            Self::VmTest(_) => "vm-test",
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let started = Instant::now();
    let result = Workspace::locate().and_then(|ws| match &cli.task {
        Task::Setup => setup::run(&ws, setup::Mode::Verbose),
        Task::Build(cli) => build::run_cli(&ws, cli),
        Task::Test => test::run(&ws),
        Task::Demo => demo::run(&ws),
        Task::Lint => lint::run(&ws),
        Task::Fuzz(args) => fuzz::run(&ws, args),
        Task::Bench(args) => bench::run(&ws, args),
        Task::Image(args) => image::run(&ws, args),
        Task::VmTest(args) => vm::run(&ws, args),
    });
    let elapsed = started.elapsed().as_secs_f64();
    match result {
        Ok(()) => {
            eprintln!("xtask: {} done in {elapsed:.1}s", cli.task.name());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("xtask: error after {elapsed:.1}s: {err:#}");
            ExitCode::FAILURE
        }
    }
}
