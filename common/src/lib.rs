//! Types shared by the kernel side (`weft-ebpf`) and the user side (`weft` agent).
//!
//! Everything here is `no_std` and allocation-free so the eBPF programs can use it.
//! - [`wire`]: byte layouts of what weft puts on the wire (VXLAN encapsulation as
//!   Weave Net's fast datapath writes it) and helpers to build and read them.
//! - [`maps`]: the `#[repr(C)]` records stored in the BPF maps, the map names, and
//!   their sizes.
//! - `netns` (user side only, feature `user`): the network namespace cookie that
//!   names an agent's pin directory, for the agent and the tests alike.
#![cfg_attr(not(feature = "user"), no_std)]

pub mod maps;
#[cfg(feature = "user")]
pub mod netns;
pub mod wire;
