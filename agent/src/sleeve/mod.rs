//! Weave's sleeve overlay (UDP 6783): frames between peers in UDP datagrams, plain or
//! sealed with the connection's session key, with heartbeats and path-MTU discovery.

pub mod crypto;
pub mod forwarder;
pub mod frame;
pub mod icmp;
pub mod replay;
