//! Helpers shared by the agent's integration tests.

// Each test crate uses its own part of these helpers.
#![allow(dead_code)]

pub mod tcp_capture;
