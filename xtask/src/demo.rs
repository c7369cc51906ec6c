//! `cargo xtask demo`: build, then bring up the multi-host testbed in network namespaces
//! with the agent on every host and show traffic crossing the fast datapath.

use anyhow::{Result, bail};

use crate::{
    build,
    workspace::{Workspace, is_root},
};

/// Builds the release agent and runs the testbed's demo with it (needs root).
pub fn run(ws: &Workspace) -> Result<()> {
    if !is_root() {
        bail!("the demo creates network namespaces and loads eBPF programs: run it as root");
    }
    let agent = build::run(ws, &build::Args::default())?;
    weft_testbed::demo::demo(&agent)
}
