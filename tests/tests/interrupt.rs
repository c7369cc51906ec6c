//! The testbed drivers' Ctrl-C handling: once installed, SIGINT and SIGTERM set the
//! flag every bounded wait checks, instead of ending the process. Needs no root.

use signal_hook::{
    consts::{SIGINT, SIGTERM},
    low_level::raise,
};
use weft_testbed::{install_interrupt_handler, interrupted};

#[test]
fn sigint_and_sigterm_set_the_flag_instead_of_terminating() {
    install_interrupt_handler().unwrap();
    assert!(!interrupted(), "no signal yet");
    raise(SIGINT).unwrap();
    assert!(interrupted(), "SIGINT recorded");
    // The default action would end this test process here.
    raise(SIGTERM).unwrap();
    assert!(interrupted());
}
